"""Per-camera profiles: ROI, colour order and thresholds of one named camera of a bundle.

A multi-camera cell runs one bundle on several cameras, each with its own light, crop and
false-alarm budget. A profile is stored in the bundle manifest under ``info.cameras.<name>``::

    info:
      cameras:
        cam_side:
          roi: [x, y, w, h]        # or null: the stream's roi
          color_order: bgr         # or null: the stream's color_order
          thresholds: {...}        # a thresholds section (image / pixel threshold ...), or null

Why ``info.cameras`` and not a new top-level manifest key: the manifest schema is strict (every
key present, none unknown), so a new top-level key would need a schema_version bump and would
make every existing bundle unreadable to this runtime and every new one to older runtimes. ``info``
is the schema's free-form section: older runtimes carry it through untouched, and this module
validates it strictly when a detector loads. It is written only through
:func:`~edge_ad.runtime.bundle.update_manifest` with a change computed *under the bundle's lock*
(a read-modify-write of the whole ``info`` section), so two cameras calibrated at the same time
(threads or processes) both land, and the manifest stays sealed and consistent. A sidecar file
would need its own seal and lock; the manifest already has both.

Torch-free.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .bundle import BundleError, Manifest, Thresholds, update_manifest
from .preprocessing import COLOR_ORDERS, _is_int

__all__ = ["CameraProfile", "camera_profiles", "save_camera_profile"]

_KEYS = ("roi", "color_order", "thresholds")


@dataclass(frozen=True)
class CameraProfile:
    """What one camera of a multi-camera cell uses instead of the bundle's defaults.

    Attributes:
        name: the camera's name (the key of ``det.stream({...})``, ``--source NAME=...``).
        roi: ``(x, y, w, h)`` crop in frame pixels, or None for the stream's.
        color_order: ``"bgr"`` / ``"rgb"`` of the camera's frames, or None for the stream's.
        thresholds: this camera's decision thresholds (model units), or None for the bundle's.
    """

    name: str
    roi: tuple[int, int, int, int] | None = None
    color_order: str | None = None
    thresholds: Thresholds | None = None

    def __post_init__(self) -> None:
        where = f"camera profile {self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise BundleError(f"camera profile names must be non-empty strings, got {self.name!r}")
        if self.roi is not None:
            roi = tuple(self.roi)
            if len(roi) != 4 or not all(_is_int(v) for v in roi) or roi[2] < 1 or roi[3] < 1 or min(roi[:2]) < 0:
                raise BundleError(f"{where}: roi must be [x, y, w, h] ints (w, h >= 1, x, y >= 0), got {self.roi!r}")
            object.__setattr__(self, "roi", tuple(int(v) for v in roi))
        if self.color_order is not None and self.color_order not in COLOR_ORDERS:
            raise BundleError(f"{where}: color_order must be one of {COLOR_ORDERS} or null, got {self.color_order!r}")
        if self.thresholds is not None and not isinstance(self.thresholds, Thresholds):
            raise BundleError(f"{where}: thresholds must be a Thresholds or null, got {self.thresholds!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"roi": list(self.roi) if self.roi is not None else None, "color_order": self.color_order,
                "thresholds": self.thresholds.to_dict() if self.thresholds is not None else None}

    @classmethod
    def from_dict(cls, name: str, d: Any) -> "CameraProfile":
        if not isinstance(d, dict) and not hasattr(d, "keys"):
            raise BundleError(f"manifest info.cameras.{name}: expected a mapping with keys {_KEYS}, got {d!r}")
        unknown = sorted(str(k) for k in d if k not in _KEYS)
        if unknown:
            raise BundleError(f"manifest info.cameras.{name}: unknown key(s) {unknown}; allowed: {', '.join(_KEYS)}")
        th = d.get("thresholds")
        return cls(name, roi=d.get("roi"), color_order=d.get("color_order"),
                   thresholds=Thresholds.from_dict(th) if th is not None else None)


def camera_profiles(manifest: Manifest) -> dict[str, CameraProfile]:
    """The manifest's camera profiles by name (empty when it has none).

    Raises:
        BundleError: ``info.cameras`` is malformed (the message names the camera and key).
    """
    cams = manifest.info.get("cameras")
    if cams is None:
        return {}
    if not hasattr(cams, "items"):
        raise BundleError(f"manifest info.cameras must be a mapping of camera name -> profile, got {cams!r}")
    return {str(name): CameraProfile.from_dict(str(name), d) for name, d in cams.items()}


def save_camera_profile(bundle_dir: str | os.PathLike, profile: CameraProfile) -> Manifest:
    """Store ``profile`` in a directory bundle (replacing that camera's old one) and re-seal it.

    The new ``info`` section is computed from the manifest read under the bundle's lock, so
    concurrent saves of different cameras never lose one another.
    """
    if not isinstance(profile, CameraProfile):
        raise TypeError(f"profile must be a CameraProfile, got {type(profile).__name__}")

    def change(manifest: Manifest) -> dict[str, Any]:
        info = dict(manifest.info)
        cams = {str(k): dict(v) for k, v in (info.get("cameras") or {}).items()}
        cams[profile.name] = profile.to_dict()
        info["cameras"] = cams
        return {"info": info}

    return update_manifest(bundle_dir, change)
