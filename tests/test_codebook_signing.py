"""codebook_store.signing and the authenticity rules: updates signed with Ed25519 or HMAC-SHA256 keys from files
are verified by a reassembler configured with the key; a consistent forgery (unsigned, another key, a signature
moved to another update), a stripped signature and bad key files are refused with a reason; a refused copy of a
header chunk does not block the signed copy. The version-jump bound is the Follower's (no key needed)."""

from __future__ import annotations

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_codebook_messages import forged, make_snapshot, survivors

from codebook_store import (
    Follower,
    KeyFileError,
    Reassembler,
    load_signer,
    load_verifier,
    open_store,
)
from codebook_store.messages import encode


def write_ed25519(tmp_path, name: str = "updates") -> tuple:
    """(private key file, public key file) of a fresh Ed25519 key pair, PEM as openssl writes them."""
    key = Ed25519PrivateKey.generate()
    private, public = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def write_hmac(tmp_path, name: str = "shared.key", secret: bytes = b"k" * 32):
    path = tmp_path / name
    path.write_bytes(secret)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def v4():
    return make_snapshot(4)


@pytest.mark.parametrize("scheme", ["ed25519", "hmac-sha256"])
def test_signed_updates_verify_and_name_their_key(tmp_path, v4, scheme):
    if scheme == "ed25519":
        private, public = write_ed25519(tmp_path)
        signer, verifier = load_signer(private), load_verifier([public])
    else:
        signer = load_signer(write_hmac(tmp_path))
        verifier = load_verifier([write_hmac(tmp_path, "copy.key")])
    assert signer.scheme == scheme and verifier.key_ids == [signer.key_id]
    records = encode(v4, None, signer=signer)
    assert dict(records[0][2])["signature"].startswith(f"{scheme}:{signer.key_id}:".encode())
    assert all("signature" not in dict(h) for _, _, h in records[1:])  # chunk 0 carries it
    (update,) = survivors(Reassembler(verifier=verifier), records)[0]
    assert update.signed_by == signer.key_id and update.version == 4
    assert repr(signer) == f"Signer(scheme='{scheme}', key_id='{signer.key_id}')"  # no key material in logs
    assert repr(verifier) == "Verifier()"


def test_the_consistent_forgery_is_refused_by_a_subscriber_with_a_key(tmp_path, v4):
    """Anyone who can write to the topic can build a self-consistent, finite update with messages.encode; only a
    signature from the publisher's key makes a subscriber with that key accept it."""
    private, public = write_ed25519(tmp_path)
    intruder, _ = write_ed25519(tmp_path, "intruder")
    verifier = load_verifier([public])
    fake = forged(v4, version=5, codebooks=torch.zeros_like(v4.codebooks))
    for records, reason in [
        (encode(fake, None), "unsigned"),
        (encode(fake, None, signer=load_signer(intruder)), "which this subscriber does not trust"),
        (encode(fake, None, signer=load_signer(write_hmac(tmp_path))), "which this subscriber does not trust"),
    ]:
        done, errors = survivors(Reassembler(verifier=verifier), records)
        assert done == [] and len(errors) == 1 and errors[0].kind == "signature", reason
        assert reason in str(errors[0])

    genuine = encode(v4, None, signer=load_signer(private))
    moved = encode(fake, None)  # the genuine signature on the forged update's header chunk
    key, value, headers = moved[0]
    moved[0] = (key, value, [*headers, ("signature", dict(genuine[0][2])["signature"])])
    done, errors = survivors(Reassembler(verifier=verifier), moved)
    assert done == [] and "bad ed25519 signature" in str(errors[0])


def test_a_stripped_signature_does_not_block_the_signed_copy(tmp_path, v4):
    """The signature is not part of the update's bytes: a copy of chunk 0 without it (or with garbage) is refused
    alone, and the signed chunk 0 that follows completes the update."""
    private, public = write_ed25519(tmp_path)
    records = encode(v4, None, 2048, signer=load_signer(private))
    key, value, headers = records[0]
    stripped = (key, value, [(n, v) for n, v in headers if n != "signature"])
    garbage = (key, value, [(n, b"ed25519:zz:!!" if n == "signature" else v) for n, v in headers])
    done, errors = survivors(Reassembler(verifier=load_verifier([public])), [stripped, garbage, *records[1:],
                                                                              records[0]])
    assert [u.version for u in done] == [4] and [e.kind for e in errors] == ["signature", "signature"]
    assert "malformed" in str(errors[1])


def test_without_a_key_signatures_are_not_checked(tmp_path, v4):
    private, _ = write_ed25519(tmp_path)
    (update,) = survivors(Reassembler(), encode(v4, None, signer=load_signer(private)))[0]
    assert update.signed_by is None


def test_bad_key_files_get_a_clear_error(tmp_path):
    private, public = write_ed25519(tmp_path)
    cases = [
        (lambda: load_signer(public), "a public key; the publisher signs with the private key"),
        (lambda: load_verifier([private]), "a private key; give subscribers the public key only"),
        (lambda: load_signer(write_hmac(tmp_path, "short.key", b"too short")), "at least 32 bytes"),
        (lambda: load_verifier([tmp_path / "missing.pem"]), "cannot read key file"),
        (lambda: load_signer(write_hmac(tmp_path, "bad.pem", b"-----BEGIN PRIVATE KEY-----\nxx\n")), "not a readable"),
    ]
    for call, message in cases:
        with pytest.raises(KeyFileError, match=message):
            call()


def test_a_version_jump_beyond_the_bound_is_refused_and_latest_does_not_move(v4):
    """A forged, finite, far-future version (no key configured): refused by the jump bound; the genuine versions
    after it still arrive and the mirror's latest never moves to it."""
    child = make_snapshot(5, 4, base=v4)
    leap = forged(v4, version=1_000_000_000, codebooks=torch.zeros_like(v4.codebooks))
    store = open_store("memory://")
    follower = Follower("sparc", start=0, store=store, max_version_jump=100)
    done, errors = survivors(Reassembler(), [*encode(v4, None), *encode(leap, None), *encode(child, v4)])
    assert errors == [] and [u.version for u in done] == [4, 1_000_000_000, 5]
    yielded = [got.version for u in done if (got := follower.offer(u)) is not None]
    assert yielded == [4, 5] and follower.stats.refused == 1
    assert store.versions() == [4, 5] and store.latest_version() == 5 and follower.reference == 5

    restarted = Follower("sparc", start="latest", store=store, max_version_jump=100)  # bound to the mirror's latest
    assert restarted.reference == 5 and restarted.offer(done[1]) is None and restarted.stats.refused == 1
    with pytest.raises(ValueError, match="max_version_jump"):
        Follower("sparc", max_version_jump=0)

