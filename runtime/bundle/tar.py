"""Bundle ``.tar`` files: writing one from a staged directory and extracting one safely."""
from __future__ import annotations

import os
import re
import shutil
import tarfile
import time
from pathlib import Path

from .durable import fsync_dir
from .schema import _CHUNK, MANIFEST_FILE, BundleError

def _is_bundle_tar(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:*") as tf:
            names = {m.name.removeprefix("./") for m in tf.getmembers()}
    except (tarfile.TarError, OSError):
        return False
    return MANIFEST_FILE in names or any(n.count("/") == 1 and n.endswith("/" + MANIFEST_FILE) for n in names)

def _write_tar(staging: Path, out: Path, names: list[str]) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{os.urandom(8).hex()}")  # unique: concurrent writers never share it
    mtime = int(time.time())
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
            for name in names:
                path = staging / name
                info = tarfile.TarInfo(name)
                info.size = path.stat().st_size
                info.mtime = mtime
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(path, "rb") as f:
                    tf.addfile(info, f)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the tar is on disk before it takes the name of the old one
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        if tmp.exists():
            tmp.unlink()

def _safe_extract(tar_path: Path, root: Path) -> None:
    """Extract regular files only; refuse absolute / '..' names, links, devices and duplicates."""
    label = str(tar_path)
    try:
        tf = tarfile.open(tar_path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise BundleError(f"{label} is not a readable tar: {e}") from None
    with tf:
        members = tf.getmembers()
        names: dict[str, tarfile.TarInfo] = {}
        for m in members:
            raw = m.name
            name = raw
            while name.startswith("./"):
                name = name[2:]
            name = name.rstrip("/")
            parts = name.split("/")
            if (raw.startswith(("/", "\\")) or "\\" in raw or re.match(r"^[A-Za-z]:", raw)
                    or any(p == ".." for p in parts)):
                raise BundleError(
                    f"{label}: unsafe member {raw!r} (absolute path or '..' component); refusing to extract. "
                    "The tar was not written by edge_ad: re-create it with write_bundle(tar=True)"
                )
            if m.issym() or m.islnk():
                raise BundleError(
                    f"{label}: member {raw!r} is a {'symbolic' if m.issym() else 'hard'} link to {m.linkname!r}; "
                    "bundles hold regular files only: re-create the tar without links"
                )
            if not (m.isfile() or m.isdir()):
                raise BundleError(f"{label}: member {raw!r} is not a regular file or directory; refusing to extract")
            if name in ("", "."):
                continue
            if name in names and not (m.isdir() and names[name].isdir()):
                raise BundleError(f"{label}: member {name!r} appears twice; refusing an ambiguous bundle")
            names[name] = m
        # Members under a single top-level folder (``tar -cf b.tar bundle/``) are accepted too.
        prefix = ""
        if MANIFEST_FILE not in names:
            tops = {n.split("/")[0] for n in names}
            if len(tops) == 1 and f"{next(iter(tops))}/{MANIFEST_FILE}" in names:
                prefix = next(iter(tops)) + "/"
            else:
                raise BundleError(f"{label} is not a bundle: no {MANIFEST_FILE} at its root")
        real_root = os.path.realpath(root)
        for name, m in names.items():
            if not m.isfile():
                continue
            rel = name[len(prefix):] if prefix else name
            if not rel:
                continue
            dest = root / rel
            if os.path.commonpath([real_root, os.path.realpath(dest)]) != real_root:  # belt and braces
                raise BundleError(f"{label}: member {name!r} would land outside the extraction directory")
            dest.parent.mkdir(parents=True, exist_ok=True)
            fin = tf.extractfile(m)
            if fin is None:  # pragma: no cover - isfile() members always have data
                continue
            with fin, open(dest, "wb") as fout:
                shutil.copyfileobj(fin, fout, _CHUNK)
            os.chmod(dest, 0o644)
