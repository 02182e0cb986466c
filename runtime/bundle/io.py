"""Writing, updating and loading bundle directories (and ``.tar`` bundles through :mod:`.tar`)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tarfile
import tempfile
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..preprocess_spec import PreprocessSpec
from ..targets import Target
from .durable import fault_point, fsync_tree, locked_dir, remove_stale_temps, replace_file_atomic, swap_in_dir
from .formats import check_artifact_formats
from .integrity import _copy_hashed, _read_fidelity, _verify_artifacts
from .schema import (
    _FIX_EDIT,
    _SEAL_KEY,
    ENGINES_DIR,
    FIDELITY_FILE,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    SIGNATURE_FILE,
    BundleError,
    Manifest,
    OutputSpec,
    Source,
    Thresholds,
    _fail,
    _mapping,
    _plain,
    _schema_version_error,
    _check_artifact_name,
    manifest_digest,
)
from .signing import signature_bytes, verify_signature
from .tar import _is_bundle_tar, _safe_extract, _write_tar

# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _manifest_text(manifest: Manifest) -> str:
    import yaml

    doc = manifest.to_dict()
    doc[_SEAL_KEY] = manifest_digest(manifest)
    header = (
        f"# edge_ad bundle manifest (schema_version {manifest.schema_version}).\n"
        "# Sealed by manifest_sha256: change it with edge_ad.runtime.update_manifest, not by hand.\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, allow_unicode=True, width=100)


def write_bundle(
    out: str | os.PathLike,
    manifest: Manifest,
    artifacts: Mapping[str, Source],
    *,
    fidelity: Mapping[str, Any] | None = None,
    tar: bool = False,
    sign_key: str | os.PathLike | None = None,
) -> Path:
    """Write a bundle: copy ``artifacts`` in, hash them, write the sealed manifest last.

    Args:
        out: the bundle directory (created; an existing *bundle* or an empty directory is replaced, anything
            else is refused), or with ``tar=True`` the ``.tar`` file (``.tar`` is appended when missing).
        manifest: validated :class:`Manifest`; its ``artifacts`` field is replaced by the computed records.
        artifacts: bundle-relative name (``"model.onnx"``, ``"openvino/model.xml"``) -> source file path or bytes.
        fidelity: the full fidelity report, written as ``fidelity.json`` (plain JSON values; use None for NaN).
        tar: write one uncompressed ``.tar`` (members at its root, ``manifest.yaml`` first) instead of a directory.
        sign_key: PEM file of an Ed25519 private key: also write ``manifest.sig`` (:mod:`.signing`; needs
            the ``cryptography`` package).

    Returns:
        The bundle directory or ``.tar`` path.

    Raises:
        BundleError: invalid names / pickle content / manifest, missing required artifacts, or an
            ``out`` that is not a bundle.
    """
    if not isinstance(manifest, Manifest):
        raise BundleError(f"write_bundle expects a Manifest, got {type(manifest).__name__}")
    out = Path(out)
    if tar and out.suffix != ".tar":
        out = out.with_name(out.name + ".tar")
    _check_replaceable(out, tar)
    sources: dict[str, Source] = {}
    for name, source in artifacts.items():
        sources[_check_artifact_name(name)] = source
    if fidelity is not None:
        if FIDELITY_FILE in sources:
            raise BundleError(
                f"pass the fidelity report either as fidelity= or as the artifact {FIDELITY_FILE!r}, not both"
            )
        plain = _plain(_mapping(fidelity, "fidelity.json"), "fidelity.json")
        sources[FIDELITY_FILE] = json.dumps(plain, indent=2, sort_keys=True, allow_nan=False).encode("utf-8") + b"\n"

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it 0700; the bundle must be readable by the service user
    try:
        records = {}
        for name, source in sorted(sources.items()):
            dest = staging / name
            records[name] = _copy_hashed(source, dest, name)
        sizes = {name: record.bytes for name, record in records.items()}
        check_artifact_formats(staging, sizes, f"being written to {out}")
        if FIDELITY_FILE in records:
            _read_fidelity(staging / FIDELITY_FILE)
        final = manifest.replace(artifacts=records)
        final.check_complete()
        # Last: a bundle is complete when it has one.
        (staging / MANIFEST_FILE).write_text(_manifest_text(final), encoding="utf-8")
        signed = []
        if sign_key is not None:
            (staging / SIGNATURE_FILE).write_bytes(signature_bytes(manifest_digest(final), sign_key))
            signed = [SIGNATURE_FILE]
        if tar:
            _write_tar(staging, out, [MANIFEST_FILE, *signed, *sorted(records)])
        else:
            fsync_tree(staging)  # every artifact and folder is on disk before the old bundle goes
            _swap_in(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _check_replaceable(out: Path, tar: bool) -> None:
    if tar:
        if out.is_dir():
            raise BundleError(
                f"{out} is a directory; write_bundle(tar=True) writes a .tar file there, pick another path"
            )
        if out.exists() and not _is_bundle_tar(out):
            raise BundleError(
                f"{out} exists and is not a bundle .tar; refusing to overwrite it (remove it or pick another path)"
            )
        return
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise BundleError(
                f"{out} exists and is not a directory; refusing to overwrite it (remove it or pick another path)"
            )
        if any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
            raise BundleError(
                f"{out} is a non-empty directory without {MANIFEST_FILE}, not a bundle; refusing to overwrite it "
                "(write the bundle to a new or empty directory)"
            )


def _swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` (absent, empty or an old bundle) by the finished, fsynced ``staging`` directory.

    The old bundle's lock is held during the swap, so a concurrent :func:`update_manifest` either
    finishes first (and is then replaced whole) or waits and updates the new bundle.
    """
    if not out.exists():
        swap_in_dir(staging, out)
        return
    with locked_dir(out):
        old = swap_in_dir(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def update_manifest(bundle_dir: str | os.PathLike,
                    changes: Mapping[str, Any] | Callable[[Manifest], Mapping[str, Any]], *,
                    sign_key: str | os.PathLike | None = None) -> Manifest:
    """Change top-level manifest fields of a directory bundle (e.g. ``thresholds``) and re-seal it.

    A locked read-verify-modify-write: under an exclusive lock on the bundle directory the bundle is
    loaded and verified, changed and written back atomically (unique temp file, fsync, ``os.replace``,
    fsync of the directory). Concurrent updates (threads or processes) are serialised, each sees the
    previous one's result, and a crash at any point leaves the old or the new manifest, never a torn one.
    ``artifacts`` and ``schema_version`` cannot be changed here (re-write the bundle). Values may be
    plain dicts or the section dataclasses.

    A signed bundle's ``manifest.sig`` no longer matches the changed manifest: it is re-signed with
    ``sign_key`` (PEM Ed25519 private key) when given, else removed (the bundle is then unsigned).

    ``changes`` may also be a function of the current (verified) manifest returning the changes:
    it is called under the lock, so a read-modify-write of one section (e.g. adding one camera's
    profile to ``info``) never loses a concurrent update of the same section.
    """
    path = Path(bundle_dir)
    if not path.is_dir():
        raise BundleError(f"update_manifest works on bundle directories; {path} is not one (extract the .tar first)")
    with locked_dir(path) as dir_fd:
        remove_stale_temps(dir_fd)
        current = load_bundle(path, verify=True)
        manifest = _apply_changes(current, changes(current.manifest) if callable(changes) else changes)
        # Signed before anything is written, so a bad key changes nothing.
        signature = signature_bytes(manifest_digest(manifest), sign_key) if sign_key is not None else None
        fault_point("manifest-before-write")
        replace_file_atomic(dir_fd, MANIFEST_FILE, _manifest_text(manifest).encode("utf-8"))
        # After the manifest: a crash in between leaves a signature of the old manifest, which fails closed.
        if signature is not None:
            replace_file_atomic(dir_fd, SIGNATURE_FILE, signature)
        else:
            try:
                os.unlink(SIGNATURE_FILE, dir_fd=dir_fd)
                os.fsync(dir_fd)
            except FileNotFoundError:
                pass
    return manifest


def _apply_changes(bundle: "Bundle", changes: Mapping[str, Any]) -> Manifest:
    """The bundle's manifest with the top-level ``changes`` applied, validated and complete."""
    doc = bundle.manifest.to_dict()
    for key, value in changes.items():
        if key in ("artifacts", "schema_version", _SEAL_KEY):
            raise BundleError(f"update_manifest cannot change {key!r}; write a new bundle with write_bundle")
        if key not in doc:
            raise BundleError(f"update_manifest: unknown manifest field {key!r}; fields: {', '.join(Manifest.KEYS)}")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = value.to_dict()  # type: ignore[union-attr]
        elif key == "outputs" and isinstance(value, (list, tuple)):
            value = [v.to_dict() if isinstance(v, OutputSpec) else v for v in value]
        doc[key] = value
    manifest = Manifest.from_dict(doc)
    manifest.check_complete()
    return manifest


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


class Bundle:
    """A loaded, validated bundle.

    Attributes:
        root: directory holding the files (the bundle itself, or where a ``.tar`` was extracted).
        source: what was loaded (the directory or the ``.tar``).
        manifest: the validated :class:`Manifest`.
    """

    def __init__(self, root: Path, source: Path, manifest: Manifest, fidelity: dict[str, Any] | None,
                 temp_dir: Path | None = None) -> None:
        self.root = root
        self.source = source
        self.manifest = manifest
        self._fidelity = fidelity
        self._finalizer = (
            weakref.finalize(self, shutil.rmtree, str(temp_dir), ignore_errors=True) if temp_dir is not None else None
        )

    def path(self, name: str) -> Path:
        """Absolute path of the listed artifact ``name`` (e.g. ``"model.onnx"``)."""
        if name not in self.manifest.artifacts:
            raise BundleError(
                f"bundle {self.source} has no artifact {name!r}; it has: {', '.join(self.manifest.artifacts)}"
            )
        return self.root / name

    def has(self, name: str) -> bool:
        """Whether the artifact ``name`` is listed."""
        return name in self.manifest.artifacts

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        """How frames become this model's input."""
        return self.manifest.preprocess_spec

    @property
    def thresholds(self) -> Thresholds | None:
        """Decision thresholds, or None when the bundle was not calibrated."""
        return self.manifest.thresholds

    @property
    def normalization(self) -> Mapping[str, float]:
        """The stored score / map statistics."""
        return self.manifest.normalization

    @property
    def fidelity(self) -> dict[str, Any] | None:
        """The full ``fidelity.json`` report (a copy), or None when the bundle has none."""
        return json.loads(json.dumps(self._fidelity)) if self._fidelity is not None else None

    @property
    def target(self) -> Target:
        """The registry entry of the bundle's target."""
        return self.manifest.target_info

    @property
    def engines_dir(self) -> Path:
        """Where device-built TensorRT engines go (not created here; not covered by the manifest).

        For a ``.tar`` bundle this is inside the extraction directory: pass ``extract_to`` to
        :func:`load_bundle` to keep engines between runs.
        """
        return self.root / ENGINES_DIR

    def verify(self) -> None:
        """Re-check every artifact's size, sha256 and format, and that no file is unlisted.

        Raises:
            BundleError: naming the artifact / file and the fix.
        """
        _verify_artifacts(self.root, self.manifest, checksums=True, label=str(self.source))

    def check_signature(self, verify_key: str | os.PathLike) -> None:
        """Refuse (:class:`BundleError`) unless the bundle is signed with the Ed25519 key whose public PEM
        file is ``verify_key``, and its artifacts still match their checksums."""
        manifest = _read_manifest(self.root, str(self.source), True, verify_key)
        if manifest != self.manifest:
            raise BundleError(f"bundle {self.source}: manifest.yaml changed since it was loaded; load it again")
        self.verify()

    def close(self) -> None:
        """Delete the temporary extraction directory of a ``.tar`` bundle (no-op for directories)."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> "Bundle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Bundle({str(self.source)!r}, method={m.method!r}, target={m.target!r}, precision={m.precision!r}, "
                f"input={m.input.height}x{m.input.width})")


def load_bundle(
    path: str | os.PathLike,
    *,
    verify: bool = True,
    extract_to: str | os.PathLike | None = None,
    verify_key: str | os.PathLike | None = None,
) -> Bundle:
    """Load and validate a bundle directory or ``.tar``.

    Args:
        path: bundle directory, or ``.tar`` written by :func:`write_bundle` (``tar -cf`` of a bundle
            directory works too; members may sit under one top-level folder).
        verify: check the manifest seal and every artifact's sha256 (sizes, schema, artifact formats
            and unlisted files are always checked). Turn off only for fast restarts of a bundle
            verified before.
        extract_to: where to extract a ``.tar`` (a new or empty directory, kept); default a
            temporary directory removed by :meth:`Bundle.close` or garbage collection.
        verify_key: PEM file of the Ed25519 public key the bundle must be signed with
            (:mod:`.signing`); unsigned bundles and bundles signed by another key are refused.
            None (default) = signatures are not checked.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        BundleError: anything else, with the file / field and the fix in the message.
        ImportError: ``verify_key`` was given but the ``cryptography`` package is missing.
    """
    if verify_key is not None and not verify:
        raise ValueError("verify_key needs verify=True: the signature covers the artifacts through their checksums")
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"bundle not found: {source}")
    if source.is_dir():
        root, temp_dir = source, None
    elif tarfile.is_tarfile(source):
        if extract_to is not None:
            root, temp_dir = Path(extract_to), None
            if root.exists() and (not root.is_dir() or any(root.iterdir())):
                raise BundleError(f"extract_to={root} must be a new or empty directory")
            root.mkdir(parents=True, exist_ok=True)
        else:
            root = temp_dir = Path(tempfile.mkdtemp(prefix="edge_ad_bundle_"))
        try:
            label = str(source)
            _safe_extract(source, root, lambda r: {
                name: record.bytes
                for name, record in _read_manifest(r, label, verify, verify_key,
                                                   signature_optional=True).artifacts.items()
            })
            return _load_dir(root, source, verify, temp_dir, verify_key)
        except BaseException:
            # Leave nothing half-extracted behind (extract_to was new or empty).
            if temp_dir is not None:
                shutil.rmtree(temp_dir, ignore_errors=True)
            else:
                for child in root.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            raise
    else:
        raise BundleError(
            f"{source} is neither a bundle directory nor a .tar bundle; "
            "bundles are written by edge-ad convert / write_bundle"
        )
    return _load_dir(root, source, verify, temp_dir, verify_key)


def _read_manifest_doc(root: Path, label: str) -> dict[str, Any]:
    import yaml

    path = root / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(
            f"{label} is not a bundle: no {MANIFEST_FILE} (an unfinished write, or not written by "
            "edge-ad convert / write_bundle)"
        )
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise BundleError(f"{label}/{MANIFEST_FILE} is not valid YAML: {e}") from None
    except RecursionError:  # a hostile, deeply nested document; a manifest is a few levels deep
        raise BundleError(f"{label}/{MANIFEST_FILE} is nested too deeply to be a manifest") from None
    if not isinstance(doc, dict):
        raise BundleError(f"{label}/{MANIFEST_FILE} must hold a mapping, got {type(doc).__name__}")
    return doc


def _load_dir(root: Path, source: Path, verify: bool, temp_dir: Path | None,
              verify_key: str | os.PathLike | None) -> Bundle:
    label = str(source)
    manifest = _read_manifest(root, label, verify, verify_key)
    _verify_artifacts(root, manifest, checksums=verify, label=label)
    fidelity = _read_fidelity(root / FIDELITY_FILE) if FIDELITY_FILE in manifest.artifacts else None
    return Bundle(root, source, manifest, fidelity, temp_dir)


def _read_manifest(root: Path, label: str, verify: bool, verify_key: str | os.PathLike | None, *,
                   signature_optional: bool = False) -> Manifest:
    """The validated manifest of ``root``: schema version, schema, seal (``verify``), and the signature
    (``verify_key``; with ``signature_optional`` only when ``manifest.sig`` is there, for the early check
    of a ``.tar`` before its artifacts are extracted)."""
    doc = _read_manifest_doc(root, label)
    # Version first: a newer schema may legitimately fail every other check.
    if "schema_version" not in doc:
        raise BundleError(
            f"{label}/{MANIFEST_FILE} has no schema_version; it was not written by edge-ad: re-convert the model"
        )
    version = doc["schema_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise BundleError(f"{label}/{MANIFEST_FILE}: " + str(_fail("schema_version", "an integer", version)))
    if version != SCHEMA_VERSION:
        raise _schema_version_error(version, doc.get("sdk_version"), f"bundle {label}")
    seal = doc.pop(_SEAL_KEY, None)
    try:
        manifest = Manifest.from_dict(doc)
        manifest.check_complete()
    except BundleError as e:
        raise BundleError(f"{label}/{MANIFEST_FILE}: {e}") from None
    if verify:
        if seal is None:
            raise BundleError(f"{label}/{MANIFEST_FILE} has no {_SEAL_KEY}; {_FIX_EDIT}")
        actual = manifest_digest(manifest)
        if seal != actual:
            raise BundleError(
                f"{label}/{MANIFEST_FILE} was modified after the bundle was written: its content no longer matches "
                f"{_SEAL_KEY} (recorded {str(seal)[:16]}..., content {actual[:16]}...). Restore the original file or "
                "re-create the bundle; for an intended change use edge_ad.runtime.update_manifest(bundle_dir, {...}), "
                "which re-seals it"
            )
        if verify_key is not None and not (signature_optional and not (root / SIGNATURE_FILE).is_file()):
            verify_signature(root, actual, verify_key, label)
    return manifest
