"""Optional Ed25519 signatures of bundles: authenticity on top of the unkeyed seal.

``manifest_sha256`` is a plain sha256: it detects corruption and accidental edits, but anyone who
can write the bundle can re-seal it. A signature binds the manifest (and through its sha256 list
every artifact) to a private key held by the plant's conversion pipeline::

    openssl genpkey -algorithm ed25519 -out sign.pem            # private key: stays on the build host
    openssl pkey -in sign.pem -pubout -out sign.pub             # public key: goes to every device
    edge-ad convert RUN --target intel-cpu --out bundle/ --sign-key sign.pem
    Detector.load("bundle/", verify_key="sign.pub")             # refuses unsigned / foreign bundles

The signature lives in ``manifest.sig`` (JSON: format, the signed ``manifest_sha256``, the public
key's fingerprint, the signature), beside ``manifest.yaml``; it is not an artifact (it signs the
manifest). It signs the bytes ``b"edge_ad bundle manifest_sha256 " + <hex digest>``.

Needs the ``cryptography`` package (``pip install 'edge-ad[sign]'``) only when a key is given; the
runtime imports without it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .schema import SIGNATURE_FILE, BundleError

SIGNATURE_FORMAT = "edge_ad-ed25519-v1"
_PREFIX = b"edge_ad bundle manifest_sha256 "


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ImportError(
            "bundle signing / verification needs the 'cryptography' package: pip install 'edge-ad[sign]' "
            "(or pip install cryptography)"
        ) from None
    return serialization, ed25519, InvalidSignature


def _read_key(path: str | os.PathLike, private: bool):
    serialization, ed25519, _ = _crypto()
    what = "private" if private else "public"
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read the {what} signing key {path}: {e}") from None
    try:
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as e:
        raise BundleError(
            f"{path} is not an unencrypted PEM {what} key ({e}); create one with "
            + ("'openssl genpkey -algorithm ed25519 -out sign.pem'" if private
               else "'openssl pkey -in sign.pem -pubout -out sign.pub'")
        ) from None
    expected = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, expected):
        raise BundleError(f"{path} is a {type(key).__name__.lstrip('_')}, not an Ed25519 {what} key")
    return key


def _fingerprint(public_key) -> str:
    serialization, _, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_signing_key(private_path: str | os.PathLike, public_path: str | os.PathLike) -> None:
    """Write a new Ed25519 key pair as PEM files (private: PKCS#8, mode 0600; public: SubjectPublicKeyInfo)."""
    serialization, ed25519, _ = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    Path(public_path).write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def signature_bytes(digest: str, sign_key: str | os.PathLike) -> bytes:
    """The ``manifest.sig`` content signing the manifest seal ``digest`` with the private key file ``sign_key``."""
    key = _read_key(sign_key, private=True)
    doc = {
        "format": SIGNATURE_FORMAT,
        "manifest_sha256": digest,
        "public_key_sha256": _fingerprint(key.public_key()),
        "signature": key.sign(_PREFIX + digest.encode("ascii")).hex(),
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def verify_signature(root: Path, digest: str, verify_key: str | os.PathLike, label: str) -> None:
    """Check ``root/manifest.sig`` signs the manifest seal ``digest`` with the key whose public half is
    the PEM file ``verify_key``. Raises :class:`BundleError` naming what is wrong and the fix."""
    _, _, invalid_signature = _crypto()
    public = _read_key(verify_key, private=False)
    path = root / SIGNATURE_FILE
    fix = "re-convert with edge-ad convert --sign-key (or re-sign with update_manifest(..., sign_key=))"
    if not path.is_file():
        raise BundleError(f"bundle {label} is not signed (no {SIGNATURE_FILE}) but a verify key was given; {fix}")
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
        fmt, signed, fingerprint = doc["format"], doc["manifest_sha256"], doc["public_key_sha256"]
        signature = bytes.fromhex(doc["signature"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise BundleError(f"bundle {label}: {SIGNATURE_FILE} is malformed ({type(e).__name__}: {e}); {fix}") from None
    if fmt != SIGNATURE_FORMAT:
        raise BundleError(f"bundle {label}: {SIGNATURE_FILE} has format {fmt!r}, expected {SIGNATURE_FORMAT!r}")
    if fingerprint != _fingerprint(public):
        raise BundleError(
            f"bundle {label} is signed by another key (fingerprint {str(fingerprint)[:16]}..., {verify_key} is "
            f"{_fingerprint(public)[:16]}...): it was not produced by the pipeline that holds this key; refusing it"
        )
    if signed != digest:
        raise BundleError(
            f"bundle {label}: {SIGNATURE_FILE} signs another manifest (manifest_sha256 {str(signed)[:16]}..., the "
            f"manifest is {digest[:16]}...): the manifest changed after signing; {fix}"
        )
    try:
        public.verify(signature, _PREFIX + digest.encode("ascii"))
    except invalid_signature:
        raise BundleError(f"bundle {label}: the signature in {SIGNATURE_FILE} does not verify with {verify_key}; "
                          "the bundle or its signature was altered: refusing it") from None
