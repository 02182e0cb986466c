"""Artifact integrity: sizes, sha256, pickle-freedom and "the file is what its name says".

Torch-free; needs numpy only to read ``.npy`` headers.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

from .schema import (
    _CHUNK,
    MANIFEST_FILE,
    PICKLE_SUFFIXES,
    ArtifactRecord,
    BundleError,
    Manifest,
    Source,
)

_PICKLE_WINDOW = 1 << 20
_PICKLE_IMPORT_OPS = frozenset({"GLOBAL", "STACK_GLOBAL"})


def _is_pickle_stream(path: Path) -> bool:
    """Whether ``path`` holds a protocol 2+ pickle (PyTorch, joblib, numpy object arrays, ...).

    Cheap for everything else: only files starting with PROTO (0x80) and a protocol number 2..5 are
    parsed, with :mod:`pickletools` (which decodes opcodes and never executes anything), within a
    1 MiB window. It is a pickle when either

    * the window holds a complete, stack-consistent pickle (``pickletools.dis``) that has at least
      8 opcodes, ends the file, or is followed by another pickle (legacy ``torch.save``); or
    * at least 8 opcodes parse and one imports a global (a pickle larger than the window).

    Raw weights that happen to start with 0x80 0x02..0x05 (OpenVINO ``.bin``) fail both: on random
    data the rate is below 1e-9.
    """
    import pickletools

    with open(path, "rb") as f:
        window = f.read(_PICKLE_WINDOW)
        size = os.fstat(f.fileno()).st_size
    if len(window) < 2 or window[0] != 0x80 or not 2 <= window[1] <= 5:
        return False
    names: list[str] = []
    stop = None
    try:
        for op, _arg, pos in pickletools.genops(window):
            names.append(op.name)
            if op.name == "STOP":
                stop = pos
                break
    except Exception:  # unknown opcode, or an argument running past the window
        pass
    if len(names) >= 8 and _PICKLE_IMPORT_OPS.intersection(names):
        return True
    if stop is None:
        return False
    try:
        pickletools.dis(window[: stop + 1], out=_NullWriter())
    except Exception:
        return False
    rest = window[stop + 1 : stop + 3]
    return len(names) >= 8 or stop + 1 == size or (len(rest) == 2 and rest[0] == 0x80 and 2 <= rest[1] <= 5)


class _NullWriter:
    """A text sink for ``pickletools.dis`` (its listing is not needed, only whether it parses)."""

    def write(self, text: str) -> int:
        return len(text)


def _npy_has_objects(f: BinaryIO, label: str) -> bool:
    magic = f.read(8)
    if len(magic) < 8 or magic[:6] != b"\x93NUMPY":
        raise BundleError(f"artifact {label} is not a .npy file (bad magic); write it with numpy.save")
    major = magic[6]
    size_bytes = 2 if major == 1 else 4
    header_len = int.from_bytes(f.read(size_bytes), "little")
    header = f.read(header_len).decode("latin1" if major < 3 else "utf-8")
    try:
        meta = ast.literal_eval(header)
        import numpy as np

        dtype = np.lib.format.descr_to_dtype(meta["descr"])
    except Exception as e:  # malformed header
        raise BundleError(f"artifact {label}: unreadable .npy header ({e}); write it with numpy.save") from None
    return bool(dtype.hasobject)


def _check_not_pickle(name: str, path: Path) -> None:
    """Refuse pickle content whatever the suffix; check ONNX / IR look like what they claim."""
    lower = name.lower()
    with open(path, "rb") as f:
        head = f.read(64)
    fix = "bundles never hold pickles; export to ONNX / OpenVINO IR / safetensors / plain .npy"
    if _is_pickle_stream(path):
        raise BundleError(f"artifact {name!r} is a Python pickle (it parses as pickle opcodes); {fix}")
    if lower.endswith(".npy"):
        with open(path, "rb") as f:
            if _npy_has_objects(f, repr(name)):
                raise BundleError(f"artifact {name!r} is an object-dtype .npy (loading it needs pickle); {fix}")
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                members = zf.namelist()
                for member in members:
                    if member.lower().endswith(PICKLE_SUFFIXES) or member.endswith("data.pkl"):
                        raise BundleError(
                            f"artifact {name!r} is a zip holding the pickle {member!r} (a PyTorch checkpoint?); {fix}"
                        )
                    if member.lower().endswith(".npy"):
                        with zf.open(member) as mf:
                            if _npy_has_objects(mf, f"{name!r} member {member!r}"):  # type: ignore[arg-type]
                                raise BundleError(f"artifact {name!r} holds the object-dtype array {member!r}; {fix}")
        except zipfile.BadZipFile:
            pass  # raw data that merely starts with the zip magic (e.g. weights): nothing to unpack
    if lower.endswith(".onnx"):
        if not head:
            raise BundleError(f"artifact {name!r} is empty; re-export the ONNX model")
        # ModelProto serialises its fields in number order: ir_version (field 1, varint) comes first.
        if head[0] != 0x08:
            raise BundleError(
                f"artifact {name!r} is not an ONNX protobuf (first bytes {head[:8].hex()}); re-export it with "
                "torch.onnx.export / onnx.save"
            )
    if lower.endswith(".xml") and not head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
        raise BundleError(f"artifact {name!r} is not XML (OpenVINO IR); re-export it with openvino.save_model")


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
        _check_not_pickle(name, path)


def _read_fidelity(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BundleError(f"{path} must hold a JSON object, got {type(doc).__name__}")
    return doc
