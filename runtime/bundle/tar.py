"""Bundle ``.tar`` files: writing one from a staged directory and extracting one safely.

Extraction reads the manifest member first and extracts only what it lists (plus ``engines/``):

* every member is checked at its header, before its data is read: absolute names, ``..``,
  backslashes, links, devices, FIFOs, duplicates and sparse members (GNU or PAX) are refused;
* a listed artifact must have exactly its recorded byte count, and is copied with that cap; the
  whole extraction is capped at the sum of the recorded sizes plus :data:`MAX_ENGINES_BYTES` for
  ``engines/`` (device-built engines the manifest cannot list);
* members the manifest does not list are refused (a bundle directory refuses them too);
* ``manifest.yaml`` is capped at :data:`MAX_MANIFEST_BYTES`, ``manifest.sig`` at :data:`MAX_SIGNATURE_BYTES`,
  the member count at :data:`MAX_MEMBERS`.

So a 10 KB sparse tar or a small ``.tar.gz`` cannot expand beyond what the manifest declares.
"""
from __future__ import annotations

import os
import re
import tarfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from .durable import fsync_dir
from .schema import _CHUNK, ENGINES_DIR, MANIFEST_FILE, SIGNATURE_FILE, BundleError

#: Largest ``manifest.yaml`` member accepted (real manifests are a few KB).
MAX_MANIFEST_BYTES = 1 << 20
#: Largest ``manifest.sig`` member accepted.
MAX_SIGNATURE_BYTES = 64 << 10
#: Total bytes accepted under ``engines/`` (TensorRT engines of a large ViT are a few hundred MB).
MAX_ENGINES_BYTES = 4 << 30
#: Most members a bundle tar may have.
MAX_MEMBERS = 10_000


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


def _member_name(m: tarfile.TarInfo, label: str) -> str:
    """The normalised name of a safe member; raises for unsafe names, links, devices and sparse files."""
    raw = m.name
    name = raw
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    if (raw.startswith(("/", "\\")) or "\\" in raw or re.match(r"^[A-Za-z]:", raw)
            or any(p == ".." for p in name.split("/"))):
        raise BundleError(
            f"{label}: unsafe member {raw!r} (absolute path or '..' component); refusing to extract. "
            "The tar was not written by edge_ad: re-create it with write_bundle(tar=True)"
        )
    if m.issym() or m.islnk():
        raise BundleError(
            f"{label}: member {raw!r} is a {'symbolic' if m.issym() else 'hard'} link to {m.linkname!r}; "
            "bundles hold regular files only: re-create the tar without links"
        )
    if m.type == tarfile.GNUTYPE_SPARSE or m.sparse is not None or any(
            k.startswith("GNU.sparse") for k in m.pax_headers):
        raise BundleError(f"{label}: member {raw!r} is a sparse file (it would expand beyond its stored bytes); "
                          "re-create the tar without --sparse")
    if not (m.isfile() or m.isdir()):
        raise BundleError(f"{label}: member {raw!r} is not a regular file or directory; refusing to extract")
    return name


def _safe_extract(tar_path: Path, root: Path, read_manifest: Callable[[Path], Mapping[str, int]]) -> None:
    """Extract the bundle ``tar_path`` into ``root``: the manifest first, then only what it lists.

    ``read_manifest(root)`` is called once ``manifest.yaml`` (and ``manifest.sig`` when it comes
    before the artifacts, as :func:`write_bundle` orders them) are extracted, before any artifact;
    it validates the manifest and returns ``artifact -> bytes``.
    """
    label = str(tar_path)
    try:
        tf = tarfile.open(tar_path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise BundleError(f"{label} is not a readable tar: {e}") from None
    state = _Extraction(tf, root, label)
    with tf:
        try:
            count = 0
            while (m := tf.next()) is not None:  # one header at a time: refuse before reading any data
                count += 1
                if count > MAX_MEMBERS:
                    raise BundleError(f"{label} has more than {MAX_MEMBERS} members; not a bundle")
                state.member(m, _member_name(m, label), read_manifest)
        except tarfile.TarError as e:
            raise BundleError(f"{label} is not a readable tar: {e}") from None
        state.finish(read_manifest)


class _Extraction:
    """The state of one :func:`_safe_extract`: what was seen, what the manifest allows, bytes written."""

    def __init__(self, tf: tarfile.TarFile, root: Path, label: str) -> None:
        self.tf, self.root, self.label = tf, root, label
        self.prefix: str | None = None  # "" or "folder/" once the manifest member was seen
        self.seen: dict[str, tarfile.TarInfo] = {}
        self.pending: list[tuple[str, tarfile.TarInfo]] = []  # members met before the manifest was read
        self.sizes: Mapping[str, int] | None = None
        self.engine_bytes = 0

    def member(self, m: tarfile.TarInfo, name: str, read_manifest: Callable[[Path], Mapping[str, int]]) -> None:
        if name in ("", "."):
            return
        if name in self.seen and not (m.isdir() and self.seen[name].isdir()):
            raise BundleError(f"{self.label}: member {name!r} appears twice; refusing an ambiguous bundle")
        self.seen[name] = m
        if self.prefix is None and m.isfile() and (name == MANIFEST_FILE or (
                name.count("/") == 1 and name.endswith("/" + MANIFEST_FILE))):
            # Members under a single top-level folder (``tar -cf b.tar bundle/``) are accepted too.
            self.prefix = name[: -len(MANIFEST_FILE)]
            self._copy(m, MANIFEST_FILE, MAX_MANIFEST_BYTES, exact=False)
            return
        if self.prefix is not None and m.isfile() and self._relative(name) == SIGNATURE_FILE:
            self._copy(m, SIGNATURE_FILE, MAX_SIGNATURE_BYTES, exact=False)
            return
        if self.sizes is None and self.prefix is not None and m.isfile():
            self.sizes = read_manifest(self.root)
            self._drain()
        if self.sizes is None:
            self.pending.append((name, m))
        else:
            self._place(name, m)

    def finish(self, read_manifest: Callable[[Path], Mapping[str, int]]) -> None:
        if self.prefix is None:
            raise BundleError(f"{self.label} is not a bundle: no {MANIFEST_FILE} at its root")
        if self.sizes is None:
            self.sizes = read_manifest(self.root)
            self._drain()

    def _drain(self) -> None:
        for name, m in self.pending:
            self._place(name, m)
        self.pending = []

    def _relative(self, name: str) -> str:
        if self.prefix is None:
            return name
        if self.prefix and not (name + "/").startswith(self.prefix):
            raise BundleError(f"{self.label}: member {name!r} lies outside the bundle folder {self.prefix!r}")
        return name[len(self.prefix):]

    def _place(self, name: str, m: tarfile.TarInfo) -> None:
        assert self.sizes is not None
        rel = self._relative(name)
        if not rel:
            return
        in_engines = rel.split("/")[0] == ENGINES_DIR
        if m.isdir():
            if not (in_engines or any(a.startswith(rel + "/") for a in self.sizes)):
                raise BundleError(f"{self.label}: directory {name!r} holds no listed artifact; refusing it")
            return
        if rel == SIGNATURE_FILE:  # met before the manifest (``tar -cf`` order); signatures are re-checked after
            self._copy(m, SIGNATURE_FILE, MAX_SIGNATURE_BYTES, exact=False)
            return
        if in_engines:
            self.engine_bytes += m.size
            if self.engine_bytes > MAX_ENGINES_BYTES:
                raise BundleError(f"{self.label}: {ENGINES_DIR}/ members exceed {MAX_ENGINES_BYTES} bytes; "
                                  "refusing (ship engines separately or build them on the device)")
            self._copy(m, rel, m.size, exact=True)
            return
        if rel not in self.sizes:
            raise BundleError(
                f"{self.label}: member {name!r} is not listed in {MANIFEST_FILE}; bundles hold listed artifacts only "
                f"(and {ENGINES_DIR}/): re-create the tar with write_bundle(tar=True)"
            )
        if m.size != self.sizes[rel]:
            raise BundleError(f"{self.label}: member {name!r} has {m.size} bytes, {MANIFEST_FILE} says "
                              f"{self.sizes[rel]}; refusing it (truncated or replaced: copy the bundle again)")
        self._copy(m, rel, self.sizes[rel], exact=True)

    def _copy(self, m: tarfile.TarInfo, rel: str, cap: int, *, exact: bool) -> None:
        """Copy member ``m`` to ``root/rel``, refusing more than ``cap`` bytes (or other than ``cap`` if exact)."""
        if m.size > cap:
            raise BundleError(f"{self.label}: member {m.name!r} has {m.size} bytes, more than the {cap} allowed")
        dest = self.root / rel
        real_root = os.path.realpath(self.root)
        if os.path.commonpath([real_root, os.path.realpath(dest)]) != real_root:  # belt and braces
            raise BundleError(f"{self.label}: member {m.name!r} would land outside the extraction directory")
        dest.parent.mkdir(parents=True, exist_ok=True)
        fin = self.tf.extractfile(m)
        if fin is None:  # pragma: no cover - isfile() members always have data
            raise BundleError(f"{self.label}: member {m.name!r} has no data")
        written = 0
        with fin, open(dest, "wb") as fout:
            while chunk := fin.read(min(_CHUNK, cap + 1 - written)):
                written += len(chunk)
                if written > cap:
                    raise BundleError(f"{self.label}: member {m.name!r} expands beyond {cap} bytes; refusing it")
                fout.write(chunk)
        if exact and written != cap:
            raise BundleError(f"{self.label}: member {m.name!r} holds {written} bytes, expected {cap}")
        os.chmod(dest, 0o644)
