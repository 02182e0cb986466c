"""Build (or reuse) the TensorRT engine of a bundle, on the device: ``edge-ad build-engine BUNDLE``.

Torch-free: it runs on a Jetson image that has TensorRT, numpy and PyYAML but no torch. It needs
only :mod:`edge_ad.runtime.bundle` and :mod:`edge_ad.converters.tensorrt` (which imports TensorRT
lazily, raising :class:`ImportError` with :data:`~edge_ad.converters.tensorrt.TENSORRT_MISSING`).
"""
from __future__ import annotations

import logging
from pathlib import Path

from edge_ad.runtime.bundle import ARTIFACT_ONNX, load_bundle

from .tensorrt import (
    BuildOptions,
    DeviceInfo,
    build_engine,
    device_engine_key,
    device_info,
    engine_filename,
    find_cached_engine,
    write_engine_record,
)

__all__ = ["bundle_engine_options", "build_bundle_engine"]

log = logging.getLogger(__name__)


def bundle_engine_options(
    bundle, *, workspace_mb: int = 1024, dla_core: int | None = None, timing_cache: str | Path | None = None,
    fp32_layers: str | None = None,
) -> BuildOptions:
    """The :class:`BuildOptions` of a loaded TensorRT bundle: precision from the manifest, DLA only
    where the bundle's target has DLA cores, FP32-island preset ``fp32_layers`` (None = the
    default for the GPU / DLA, see :class:`~edge_ad.converters.tensorrt.BuildOptions`).

    Raises:
        ValueError: the bundle is not a TensorRT bundle, DLA was asked of a target without DLA or
            for an INT8 (Q/DQ) bundle, or an unknown preset.
    """
    manifest = bundle.manifest
    target = bundle.target
    if manifest.engine.name != "tensorrt" or target.engine != "tensorrt":
        raise ValueError(
            f"bundle {bundle.source} is for engine {manifest.engine.name!r} (target {manifest.target!r}), "
            "not TensorRT: build-engine builds TensorRT engines only; convert the run for a TensorRT target "
            "(e.g. `edge-ad convert RUN --target jetson-orin`), or run this bundle with its own engine"
        )
    if dla_core is not None and not target.dla:
        raise ValueError(
            f"--dla-core {dla_core}: target {target.name!r} has no DLA cores (DLA targets: Jetson AGX / NX); "
            "leave it out to build for the GPU"
        )
    return BuildOptions(precision=manifest.precision, workspace_mb=workspace_mb, dla_core=dla_core,
                        timing_cache=timing_cache, fp32_layers=fp32_layers)


def build_bundle_engine(
    bundle_path: str | Path,
    *,
    workspace_mb: int = 1024,
    dla_core: int | None = None,
    timing_cache: str | Path | None = None,
    force: bool = False,
    device: DeviceInfo | None = None,
    fp32_layers: str | None = None,
) -> Path:
    """The TensorRT engine of a bundle, built on this device unless a matching one is cached.

    Loads and verifies the bundle (seal and artifact checksums), refuses non-TensorRT bundles,
    takes the precision from the manifest, and keys the engine on the ONNX bytes, TensorRT version,
    compute capability, device name and SM count, precision, DLA core and build options
    (:func:`edge_ad.converters.tensorrt.engine_cache_key`). A cached ``engines/<key>.engine`` is
    reused only when its record matches that key and its checksum
    (:func:`~edge_ad.converters.tensorrt.find_cached_engine`); otherwise the engine is built and
    stored with its record.

    Args:
        bundle_path: bundle directory. (A ``.tar`` bundle is refused: its engines would be lost
            with the temporary extraction; extract it first.)
        workspace_mb: builder workspace (MiB); part of the key.
        dla_core: Jetson DLA core (only for targets with DLA), None = GPU.
        timing_cache: tactic timing cache file to load / save (not part of the key).
        force: rebuild even when a matching engine is cached.
        device: override :func:`~edge_ad.converters.tensorrt.device_info` (tests, cross-checks).
        fp32_layers: FP32-island preset (:data:`~edge_ad.converters.tensorrt.FP32_PRESETS`); part of the key.

    Returns:
        Path of the engine under the bundle's ``engines/`` directory.

    Raises:
        ImportError: TensorRT is missing (message says what to install).
        ValueError: not a TensorRT bundle, bad options, or an invalid bundle (``BundleError``).
        FileNotFoundError: no bundle at ``bundle_path``.
    """
    return _build(bundle_path, workspace_mb=workspace_mb, dla_core=dla_core, timing_cache=timing_cache,
                  force=force, device=device, fp32_layers=fp32_layers)[0]


def _build(bundle_path, *, workspace_mb, dla_core, timing_cache, force, device, fp32_layers=None) -> tuple[Path, bool]:
    """:func:`build_bundle_engine`, also saying whether the engine was built (True) or reused."""
    path = Path(bundle_path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is not a bundle directory: extract the .tar first (engines are stored beside "
                         "the model in the bundle's engines/ folder)")
    bundle = load_bundle(path, verify=True)
    options = bundle_engine_options(bundle, workspace_mb=workspace_mb, dla_core=dla_core, timing_cache=timing_cache,
                                    fp32_layers=fp32_layers)
    onnx_path = bundle.path(ARTIFACT_ONNX)
    engines_dir = bundle.engines_dir
    device = device or device_info()  # ImportError (what to install) without TensorRT
    key = device_engine_key(onnx_path, options, device)
    digest = key.digest()
    if not force:
        cached = find_cached_engine(engines_dir, digest)
        if cached is not None:
            log.info("reusing cached engine %s", cached)
            return cached, False
    # Written atomically over any previous file of this key, then its record: a failed (re)build
    # leaves the old engine (or nothing) in place, never a half-written one.
    out = build_engine(onnx_path, options, engines_dir / engine_filename(digest))
    write_engine_record(out, key)
    return out, True
