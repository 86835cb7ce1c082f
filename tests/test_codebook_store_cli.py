"""`sparc snapshots ...` in-process through `sparc`'s main: exit codes, text and JSON output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_codebook_store import flip, make_snapshot, set_blob, two_versions

from codebook_store import open_store
from sparc_stream.cli.main import main


@pytest.fixture(params=["file", "rocksdb"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store holding v1 (parent of v2), v2 (latest) and v3 of model "sparc" (hand-made drift v1 -> v2)."""
    url = f"file://{tmp_path}/store" if request.param == "file" else f"rocksdb://{tmp_path}/store"
    parent, child = two_versions()
    with open_store(url) as store:
        store.put(parent)
        store.put(child)
        store.put(make_snapshot(3, 2), move_latest=False)
    return url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["snapshots", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "list", "--store", url)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["VERSION", "PARENT", "CREATED"]
    assert [line.split()[0] for line in lines[1:]] == ["1", "*", "3"]  # '*' marks latest (v2)
    assert "collision_rate=0.25" in lines[1]
    code, out, _ = run(capsys, "list", "--store", url, "--json")
    rows = json.loads(out)
    assert [(r["version"], r["parent"], r["is_latest"]) for r in rows] == [
        (1, None, False),
        (2, 1, True),
        (3, 2, False),
    ]
    code, out, _ = run(capsys, "list", "--store", url, "--model", "other")
    assert code == 0 and "no snapshots of model 'other'" in out


def test_show(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "show", "latest", "--store", url)
    assert code == 0
    assert out.startswith("sparc v2 (latest): 3 blobs verified (sha256)")
    assert "parent      1" in out and "weights.safetensors" in out and "feedback-events:0" in out
    code, out, _ = run(capsys, "show", "3", "--store", url, "--json")
    shown = json.loads(out)
    assert shown["verified"] is True and shown["is_latest"] is False
    assert shown["manifest"]["version"] == 3 and shown["manifest"]["parent"] == 2


def test_show_and_export_name_a_corrupt_blob(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with open_store(url) as store:
        _, blobs = store.read_raw(3)
        set_blob(store, "sparc", 3, "item_codes.safetensors", flip(blobs["item_codes.safetensors"], 100))
    for argv in (("show", "3"), ("export", "3", str(tmp_path / "out"))):
        code, out, err = run(capsys, *argv, "--store", url)
        assert code == 2 and out == ""
        assert err.count("\n") == 1
        assert "sparc v3: blob 'item_codes.safetensors' fails its checksum" in err
    assert not (tmp_path / "out" / "sparc" / "3").exists()
    assert run(capsys, "show", "2", "--store", url)[0] == 0  # the others are fine


def test_verify_and_list_flag_a_corrupt_latest(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "verify", "--store", url)
    assert code == 0 and out.splitlines() == ["  v1      ok", "* v2      ok", "  v3      ok", "3 of 3 versions verify"]
    with open_store(url) as store:
        _, blobs = store.read_raw(2)
        set_blob(store, "sparc", 2, "codebooks.safetensors", flip(blobs["codebooks.safetensors"], 90))
    code, out, err = run(capsys, "verify", "--store", url)
    lines = out.splitlines()
    assert code == 1 and err == ""
    assert lines[1].startswith("* v2      CORRUPT: snapshot sparc v2: blob 'codebooks.safetensors' fails its checksum")
    assert lines[3] == "latest fails: a worker warm start with --on-corrupt fallback continues from v1"
    code, out, _ = run(capsys, "verify", "--store", url, "--json")
    report = json.loads(out)
    assert code == 1 and report["fallback"] == 1 and [v["ok"] for v in report["versions"]] == [True, False, True]
    code, out, _ = run(capsys, "list", "--store", url)  # list reads manifests, and latest's blobs
    rows = out.splitlines()
    assert code == 0 and rows[2].split()[:2] == ["*!", "2"] and "CORRUPT: snapshot sparc v2" in rows[2]
    assert rows[-1].startswith("latest (v2) fails verification")
    code, out, _ = run(capsys, "list", "--store", url, "--json")
    assert [r["problem"] is not None for r in json.loads(out)] == [False, True, False]


def test_diff(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "diff", "1", "2", "--store", url)
    assert code == 0
    assert out.splitlines()[0] == "sparc v1 -> v2: 3 of 4 common items changed code (75.00%), 1 added, 0 removed"
    assert "item 2: (1, 1) -> (1, 2)" in out
    assert [line.split()[:2] for line in out.splitlines()[2:4]] == [["1", "50.00%"], ["2", "25.00%"]]
    code, out, _ = run(capsys, "diff", "1", "latest", "--store", url, "--json", "--items")
    diff = json.loads(out)
    assert diff["drift"]["codeword_movement"] == [1.25, 1.0] and diff["added"] == [{"item": 5, "new": [1, 1]}]


def test_rollback(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "rollback", "1", "--store", url)
    assert code == 0 and out.strip() == "sparc: latest -> v1 (was v2); v1 verified"
    code, out, _ = run(capsys, "rollback", "3", "--store", url, "--json")
    assert json.loads(out) == {"model": "sparc", "latest": 3, "previous": 1}
    code, _, err = run(capsys, "rollback", "9", "--store", url)
    assert code == 2 and "sparc v9 is not in" in err
    with open_store(url, read_only=True) as store:
        assert store.latest_version() == 3


def test_export_writes_a_file_store(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "exported"
    code, out, _ = run(capsys, "export", "2", str(target), "--store", url)
    assert code == 0 and f"exported sparc v2 to {target}/sparc/2 (4 files" in out
    assert sorted(p.name for p in (target / "sparc" / "2").iterdir()) == [
        "codebooks.safetensors",
        "item_codes.safetensors",
        "manifest.json",
        "weights.safetensors",
    ]
    with open_store(url) as source, open_store(f"file://{target}") as copy:
        assert copy.read_raw(2) == source.read_raw(2)  # byte for byte
        assert copy.latest().same_as(source.get(2))
    code, _, err = run(capsys, "export", "2", str(target), "--store", url)
    assert code == 2 and "already exists" in err


def test_reading_a_rocksdb_store_that_a_worker_holds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"rocksdb://{tmp_path}/db"
    with open_store(url) as worker:  # the running worker holds the database for writing
        worker.put(make_snapshot(1))
        assert run(capsys, "list", "--store", url)[0] == 0
        assert run(capsys, "show", "1", "--store", url)[0] == 0
        code, _, err = run(capsys, "rollback", "1", "--store", url)
        assert code == 2 and "running worker" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["list", "--store", "ftp://x"], "unknown store scheme"),
        (["list", "--store", "file:///nonexistent/dir"], "no such directory"),
        (["show", "latest", "--store", "file:///nonexistent/dir"], "no such directory"),
        (["list", "--store", "memory://", "--model", "../x"], "invalid model name"),
    ],
)
def test_user_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("sparc snapshots: error: ") and message in err and err.count("\n") == 1


def test_show_latest_of_an_empty_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    open_store(f"file://{tmp_path}").close()
    code, _, err = run(capsys, "show", "latest", "--store", f"file://{tmp_path}")
    assert code == 2 and "has no latest snapshot" in err


@pytest.mark.parametrize("action", ["list", "show", "diff", "rollback", "export"])
def test_help(action: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["snapshots", action, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--store URL" in out and "--model" in out and "--json" in out


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["snapshots", "list"], ["snapshots", "show", "x", "--store", "memory://"], ["snapshots"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    capsys.readouterr()
