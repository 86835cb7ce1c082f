"""Signatures on codebook updates: the publisher signs each update, subscribers configured with a key verify it.

Two schemes, the key in a file either way (docs/codebook-updates.md, "Signature"):
  ed25519      the publisher holds a private key (PEM, PKCS#8: `openssl genpkey -algorithm ed25519 -out
               updates.pem`), subscribers the public key (PEM, SubjectPublicKeyInfo: `openssl pkey -in
               updates.pem -pubout -out updates.pub.pem`); a subscriber cannot sign
  hmac-sha256  publisher and subscribers share one secret: the file's bytes, exactly, at least 32 of them
               (`head -c 32 /dev/urandom > updates.key`); anyone holding it can sign

Signed text (ASCII): "sparc.codebook-update/<major>\\n<model>\\n<version>\\n<update sha256, hex>". The update sha256
is the sha256 of the header chunk, which lists the sha256 of every other chunk and part, so the signature binds
the whole update. It travels in chunk 0's `signature` record header as "<scheme>:<key id>:<base64 signature>";
the key id (16 hex digits) names a key without revealing it: for ed25519 the sha256 of the 32-byte public key,
for hmac-sha256 HMAC-SHA256(key, "sparc key id"). Keys are never logged; their ids and file paths are.
`cryptography` is imported only for ed25519 keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from codebook_store.errors import KeyFileError

log = logging.getLogger(__name__)

MIN_HMAC_KEY_BYTES = 32
MAX_KEY_FILE_BYTES = 16_384


def signed_text(major: int, model: str, version: int, update_sha256: str) -> bytes:
    """The bytes a publisher signs and a subscriber verifies for one update."""
    return f"sparc.codebook-update/{major}\n{model}\n{version}\n{update_sha256}".encode("ascii")


@dataclass(frozen=True)
class Signer:
    """Signs updates with one key (the publisher's). `sign(text)` returns the `signature` header value."""

    scheme: str
    key_id: str
    _sign: Callable[[bytes], bytes] = field(repr=False)

    def sign(self, text: bytes) -> bytes:
        return f"{self.scheme}:{self.key_id}:{base64.b64encode(self._sign(text)).decode()}".encode("ascii")


@dataclass(frozen=True)
class Verifier:
    """Checks updates against the keys a subscriber trusts (several during a key rotation)."""

    keys: dict[str, tuple[str, Callable[[bytes, bytes], bool]]] = field(repr=False)  # key id -> (scheme, check)

    @property
    def key_ids(self) -> list[str]:
        return sorted(self.keys)

    def problem(self, text: bytes, header: bytes | None) -> str | None:
        """Why `header` (the `signature` header's value, None when absent) does not authenticate `text`, or
        None when it does."""
        if header is None:
            return f"unsigned (this subscriber accepts only updates signed by key {', '.join(self.key_ids)})"
        try:
            scheme, key_id, b64 = header.decode("ascii").split(":")
            signature = base64.b64decode(b64, validate=True)
        except (UnicodeDecodeError, ValueError, binascii.Error):
            return "the signature header is malformed (expected <scheme>:<key id>:<base64>)"
        if key_id not in self.keys:
            return f"signed by key {key_id}, which this subscriber does not trust (it trusts {', '.join(self.key_ids)})"
        expected_scheme, check = self.keys[key_id]
        if scheme != expected_scheme:
            return f"signature scheme {scheme!r}, key {key_id} is {expected_scheme}"
        if not check(text, signature):
            return f"bad {scheme} signature for key {key_id}"
        return None

    def signed_by(self, header: bytes) -> str:
        """The key id of a header `problem` accepted."""
        return header.decode("ascii").split(":")[1]


def load_signer(path: str | os.PathLike[str]) -> Signer:
    """The publisher's key: an Ed25519 private key (PEM) or an HMAC-SHA256 shared key (raw bytes)."""
    data = _read_key_file(path, secret=True)
    if data.lstrip().startswith(b"-----BEGIN"):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        if b"PRIVATE KEY" not in data:
            raise KeyFileError(f"{path}: a public key; the publisher signs with the private key")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{path}: not a readable unencrypted PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{path}: a {type(key).__name__}; only Ed25519 private keys sign updates")
        return Signer("ed25519", _ed25519_id(key.public_key()), key.sign)
    secret = _hmac_key(path, data)
    return Signer("hmac-sha256", _hmac_id(secret), lambda text: hmac.digest(secret, text, "sha256"))


def load_verifier(paths: Iterable[str | os.PathLike[str]]) -> Verifier:
    """The keys a subscriber trusts: Ed25519 public keys (PEM) and/or HMAC-SHA256 shared keys (raw bytes)."""
    keys: dict[str, tuple[str, Callable[[bytes, bytes], bool]]] = {}
    for path in paths:
        scheme, key_id, check = _verify_key(path)
        keys[key_id] = (scheme, check)
        log.info("trusting %s key %s from %s", scheme, key_id, path)
    if not keys:
        raise KeyFileError("no verification key given")
    return Verifier(keys)


def _verify_key(path: str | os.PathLike[str]) -> tuple[str, str, Callable[[bytes, bytes], bool]]:
    data = _read_key_file(path, secret=False)
    if data.lstrip().startswith(b"-----BEGIN"):
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        if b"PRIVATE KEY" in data:
            raise KeyFileError(f"{path}: a private key; give subscribers the public key only "
                               "(openssl pkey -in KEY.pem -pubout)")
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{path}: not a readable PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{path}: a {type(key).__name__}; only Ed25519 public keys verify updates")

        def check_ed25519(text: bytes, signature: bytes) -> bool:
            try:
                key.verify(signature, text)
            except InvalidSignature:
                return False
            return True

        return "ed25519", _ed25519_id(key), check_ed25519
    secret = _hmac_key(path, data)
    return ("hmac-sha256", _hmac_id(secret),
            lambda text, signature: hmac.compare_digest(hmac.digest(secret, text, "sha256"), signature))


def _read_key_file(path: str | os.PathLike[str], *, secret: bool) -> bytes:
    p = Path(path)
    try:
        if p.stat().st_size > MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"{p}: {p.stat().st_size} bytes is too large for a key file")
        data = p.read_bytes()
        if secret and p.stat().st_mode & 0o077:
            log.warning("key file %s is readable by group or others (chmod 600 it)", p)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {p}: {exc.strerror or exc}") from None
    return data


def _hmac_key(path: str | os.PathLike[str], data: bytes) -> bytes:
    if len(data) < MIN_HMAC_KEY_BYTES:
        raise KeyFileError(f"{path}: an HMAC key needs at least {MIN_HMAC_KEY_BYTES} bytes, the file has {len(data)} "
                           "(or give an Ed25519 PEM key)")
    return data


def _ed25519_id(public_key: object) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)  # type: ignore[attr-defined]
    return hashlib.sha256(raw).hexdigest()[:16]


def _hmac_id(secret: bytes) -> str:
    return hmac.digest(secret, b"sparc key id", "sha256").hex()[:16]
