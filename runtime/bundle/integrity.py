"""Artifact integrity: sizes, sha256, and no unlisted files in a bundle directory.

What each artifact may be is :mod:`.formats`' job (the allow-list). Torch-free.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .durable import TEMP_PATTERN
from .formats import check_artifact_formats
from .schema import (
    _CHUNK,
    ENGINES_DIR,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    ArtifactRecord,
    BundleError,
    Manifest,
    Source,
)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_hashed(source: Source, dest: Path, name: str) -> ArtifactRecord:
    """Copy ``source`` (path or bytes) to ``dest`` and hash it in the same pass."""
    digest = hashlib.sha256()
    size = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        dest.write_bytes(data)
        digest.update(data)
        size = len(data)
    elif isinstance(source, (str, os.PathLike)):
        src = Path(source)
        if not src.is_file():
            why = " (it is a directory)" if src.is_dir() else ""
            raise BundleError(f"artifact {name!r}: source {src} is not a file{why}")
        with open(src, "rb") as fin, open(dest, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                fout.write(chunk)
                digest.update(chunk)
                size += len(chunk)
    else:
        raise BundleError(f"artifact {name!r}: expected a file path or bytes, got {type(source).__name__}")
    return ArtifactRecord(sha256=digest.hexdigest(), bytes=size)


def _verify_artifacts(root: Path, manifest: Manifest, *, checksums: bool, label: str) -> None:
    real_root = os.path.realpath(root)
    for name, record in manifest.artifacts.items():
        path = root / name
        if path.is_symlink() or not path.is_file():
            what = "is a link (bundles hold regular files only)" if path.is_symlink() else "is missing"
            raise BundleError(
                f"bundle {label}: artifact {name!r} listed in {MANIFEST_FILE} {what}; the bundle is incomplete or "
                "was altered: copy the whole bundle again or re-create it"
            )
        if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            raise BundleError(f"bundle {label}: artifact {name!r} resolves outside the bundle directory; refusing it")
        size = path.stat().st_size
        if size != record.bytes:
            raise BundleError(
                f"bundle {label}: artifact {name!r} has {size} bytes, the manifest says {record.bytes} "
                "(truncated or replaced; copy the bundle again)"
            )
        if checksums:
            actual = _sha256_file(path)
            if actual != record.sha256:
                raise BundleError(
                    f"bundle {label}: sha256 mismatch for {name!r}: expected {record.sha256}, got {actual} "
                    "(the file was modified or corrupted; copy the bundle again or re-create it)"
                )
    check_artifact_formats(root, {name: record.bytes for name, record in manifest.artifacts.items()}, label)
    check_no_unlisted(root, manifest, label)


def check_no_unlisted(root: Path, manifest: Manifest, label: str) -> None:
    """Refuse files in the bundle directory that the manifest does not list (they are not checksummed,
    yet an engine could read them, e.g. as ONNX external data). Allowed besides the artifacts:
    ``manifest.yaml``, ``manifest.sig``, anything under ``engines/`` (device-built TensorRT engines)
    and the hidden temp files of an interrupted manifest update (never read)."""
    allowed = set(manifest.artifacts) | {MANIFEST_FILE, SIGNATURE_FILE}
    unlisted = []
    for dirpath, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        if rel_dir == ".":
            dirs[:] = [d for d in dirs if d != ENGINES_DIR]
            files = [f for f in files if not TEMP_PATTERN.match(f)]
        for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel not in allowed:
                unlisted.append(rel)
    if unlisted:
        shown = ", ".join(repr(n) for n in sorted(unlisted)[:5]) + (" ..." if len(unlisted) > 5 else "")
        raise BundleError(
            f"bundle {label}: {len(unlisted)} file(s) not listed in {MANIFEST_FILE}: {shown}. Unlisted files are not "
            f"checksummed, yet an engine could read them; remove them (only {ENGINES_DIR}/ may hold extra files) "
            "or re-create the bundle with them as artifacts"
        )


def _read_fidelity(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BundleError(f"{path} must hold a JSON object, got {type(doc).__name__}")
    return doc
