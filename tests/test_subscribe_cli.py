"""`sparc subscribe` without a broker (its runs against one are in test_subscribers_kafka.py), the torch-free
subscriber install, the one line a slim install gives for a command that needs more, and the contract's JSON
Schemas checked against what the code writes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from test_codebook_messages import feed, make_snapshot
from test_codebook_update_vocabulary import named

from codebook_store import Reassembler
from codebook_store.format import item_ids_json
from codebook_store.messages import SCHEMA, encode
from sparc_stream.cli import errors
from sparc_stream.cli.main import main
from sparc_stream.cli.subscribe import describe, text_line

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_the_subscriber_path_imports_no_torch():
    """What a subscriber service imports (the CLI included) loads neither torch nor the worker's stack."""
    code = (
        "import sys\n"
        "import codebook_store, codebook_store.subscribe, codebook_store.messages, codebook_store.signing\n"
        "from sparc_stream.cli.main import build_parser\n"
        "build_parser().parse_args(['subscribe', '--from', 'earliest'])\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'faust', 'faiss', 'rocksdict', 'trainer',"
        " 'streams', 'pydantic', 'matplotlib'})\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=True)
    assert done.stdout.strip() == "[]", done.stderr


@pytest.mark.parametrize("argv, message", [
    (["--from", "yesterday"], "--from must be earliest, latest or a version"),
    (["--max-version-jump", "0"], "--max-version-jump must be >= 1"),
    (["--idle-timeout", "-1"], "--idle-timeout must be > 0"),
    (["--verify-key", "/nonexistent/key.pem"], "cannot read key file"),
    (["--to-store", "ftp://x"], "unknown store scheme"),
    (["--kafka-config", "/nonexistent.json"], "cannot read --kafka-config"),
])
def test_bad_arguments_get_one_line(capsys, argv, message):
    assert main(["subscribe", "--broker", "127.0.0.1:1", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparc subscribe: error: ") and message in err[0]


def test_kafka_config_must_be_an_object_and_leave_our_settings_alone(tmp_path, capsys):
    listed = tmp_path / "list.json"
    listed.write_text("[1]")
    assert main(["subscribe", "--kafka-config", str(listed)]) == 2
    assert "must hold a JSON object" in capsys.readouterr().err
    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps({"group_id": "x", "security_protocol": "SSL"}))
    assert main(["subscribe", "--kafka-config", str(clash)]) == 2
    assert "kafka_config may not set group_id" in capsys.readouterr().err


def test_config_connects_the_subscriber_as_the_workers_connect(tmp_path, monkeypatch):
    """--config: the [kafka] settings of the workers' TOML file (secrets from their files), --broker over the
    file's servers, --kafka-config over the rest; without --config, --broker and --kafka-config alone."""
    from sparc_stream.cli.main import build_parser
    from sparc_stream.cli.subscribe import connection

    monkeypatch.delenv("SPARC_BROKER", raising=False)
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    config = tmp_path / "sparc.toml"
    config.write_text('[kafka]\nbroker = "kafka://a.example:9093,b.example:9093"\n'
                      'security_protocol = "SASL_PLAINTEXT"\n'
                      f'sasl_mechanism = "SCRAM-SHA-512"\nsasl_username = "svc"\nsasl_password_file = "{password}"\n')
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"sasl_mechanism": "SCRAM-SHA-256", "fetch_max_bytes": 1024}))

    def parsed(*argv):
        return connection(build_parser().parse_args(["subscribe", *argv]))

    servers, settings = parsed("--config", str(config))
    assert servers == ["a.example:9093", "b.example:9093"]
    assert (settings["security_protocol"], settings["sasl_mechanism"], settings["sasl_plain_username"],
            settings["sasl_plain_password"]) == ("SASL_PLAINTEXT", "SCRAM-SHA-512", "svc", "s3cret")
    servers, settings = parsed("--config", str(config), "--broker", "c.example:9092", "--kafka-config", str(extra))
    assert servers == ["c.example:9092"] and settings["sasl_mechanism"] == "SCRAM-SHA-256"
    assert settings["fetch_max_bytes"] == 1024 and settings["sasl_plain_username"] == "svc"
    assert parsed() == ("127.0.0.1:39092", {})
    assert parsed("--broker", "d:1", "--kafka-config", str(extra))[0] == "d:1"


def test_a_bad_config_file_is_one_line(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('[kafka]\nbroker = "no port here"\n')
    assert main(["subscribe", "--config", str(config)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("sparc subscribe: error: ") and "no port here" in line


def test_a_slim_install_names_the_extra_a_command_needs(monkeypatch, capsys):
    def needs_torch(args):
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    import sparc_stream.cli.demo

    monkeypatch.setattr(sparc_stream.cli.demo, "run", needs_torch)
    assert main(["demo"]) == 2
    assert capsys.readouterr().err == ("sparc demo: error: this command needs the full install (pip install "
                                       "'sparc-stream[full]'); 'torch' is missing\n")
    assert errors.extra_providing("kafka.errors") == "subscriber" and errors.extra_providing("numpy") is None


def test_one_line_per_version_says_what_a_subscriber_holds():
    parent = make_snapshot(4)
    child = make_snapshot(5, 4, base=parent)
    updates = feed(Reassembler(), [*encode(parent, None), *encode(child, parent)])
    rows = [describe(updates[0], stored=True), describe(updates[1], stored=None)]
    assert rows[0]["item_codes_known"] and not rows[1]["item_codes_known"] and rows[1]["added_items"] == 7
    assert set(rows[0]["tensor_sha256"]) == {"codebooks", "item_codes"}
    assert json.loads(json.dumps(rows[0])) == rows[0]
    assert text_line(rows[0]) == "sparc v4: 60 items, whole table, stored"
    assert text_line(rows[1]) == ("sparc v5: 67 items, remap from v4: 4 changed, 7 added, 0 removed, item codes "
                                  "unknown (no base held)")
    rebuilt = describe(updates[1].with_base(parent.item_codes), stored=None)
    expected = hashlib.sha256(child.item_codes.numpy().tobytes()).hexdigest()
    assert rebuilt["tensor_sha256"]["item_codes"] == expected
    assert rows[0]["vocabulary"] is None and rebuilt["ids_changed"] == 3 and rebuilt["rows_reused"] == 0


def test_the_line_of_a_version_with_a_vocabulary_names_its_sha256_and_counts():
    parent = named(make_snapshot(4), [f"sku-{i}" for i in range(1, 61)])
    ids = [*parent.item_ids, *(f"new-{i}" for i in range(7))]
    ids[2] = "took-row-3"
    child = named(make_snapshot(5, 4, base=make_snapshot(4)), ids)
    first, second = feed(Reassembler(), [*encode(parent, None), *encode(child, parent)])
    whole, unknown = describe(first, stored=True), describe(second, stored=None)
    text = item_ids_json(parent.item_ids)
    assert whole["vocabulary"] == {"known": True, "sent": "whole", "delta_rows": None, "bytes": len(text),
                                   "sha256": hashlib.sha256(text).hexdigest(), "strings": 60}
    assert whole["tensor_sha256"]["item_ids"] == whole["vocabulary"]["sha256"]
    assert unknown["vocabulary"] == {"known": False, "sent": "delta", "delta_rows": 8} and unknown["ids_added"] is None
    row = describe(second.with_base(parent.item_codes, parent.item_ids), stored=None)
    assert (row["ids_changed"], row["ids_added"], row["ids_removed"], row["rows_reused"]) == (3, 8, 1, 1)
    assert row["vocabulary"]["sha256"] == hashlib.sha256(item_ids_json(child.item_ids)).hexdigest()
    assert text_line(row) == (
        "sparc v5: 67 items, remap from v4: 4 changed, 7 added, 0 removed; by item: 3 changed, 8 added, 1 removed, "
        f"1 rows reused, vocabulary delta (8 rows) sha256 {row['vocabulary']['sha256'][:12]}")


def schema(name: str) -> jsonschema.Draft202012Validator:
    document = json.loads((DOCS / "schemas" / name).read_text())
    jsonschema.Draft202012Validator.check_schema(document)
    return jsonschema.Draft202012Validator(document)


def test_the_json_schemas_describe_what_the_code_writes():
    parent = make_snapshot(4)
    child = make_snapshot(5, 4, base=parent)
    manifest, header = schema("snapshot-manifest.schema.json"), schema("update-header.schema.json")
    vocab = [named(parent, [f"sku-{i}" for i in range(1, 61)]), named(child, [f"sku-{i}" for i in range(1, 68)])]
    for records in (encode(parent, None, with_weights=True), encode(child, parent, 2048),
                    encode(vocab[0], None), encode(vocab[1], vocab[0])):
        (update,) = feed(Reassembler(), records)
        header.validate(json.loads(records[0][1]))
        manifest.validate(json.loads(update.manifest_raw))
    second = json.loads(update.manifest_raw)
    assert second["format_version"] == 2 and "item_ids_delta.safetensors" in update.parts_sent
    assert not manifest.is_valid({**second, "tensors": {k: v for k, v in second["tensors"].items() if k != "item_ids"}})
    assert not manifest.is_valid({**second, "format_version": 1}) and not manifest.is_valid(
        {**second, "format_version": 3})
    broken = json.loads(encode(parent, None)[0][1])
    del broken["remap_from"]
    assert not header.is_valid(broken)
    assert not header.is_valid({**json.loads(encode(parent, None)[0][1]), "schema": "sparc.codebook-update/4.0"})
    assert f"Schema **`{SCHEMA}`**" in (DOCS / "codebook-updates.md").read_text()
