"""Deployment bundles: the one format between the converters and the device. The runtime owns it.

A bundle is a directory (or one ``.tar`` of it)::

    manifest.yaml       what the model is and how to run it (schema below), sealed by manifest_sha256
    model.onnx          always: the portable truth (Q/DQ nodes for TensorRT INT8)
    openvino/model.xml  OpenVINO IR, for OpenVINO targets
    openvino/model.bin
    fidelity.json       converted vs FP32 report (optional)
    engines/            TensorRT engines built on the device later; never listed in the manifest

``manifest.yaml`` (schema_version 1; every key is required, ``null`` where allowed)::

    schema_version: 1
    sdk_version: 0.1.0                      # edge-ad that wrote the bundle
    created: '2025-01-01T12:00:00+00:00'    # ISO 8601
    method: foundad
    backbone: {name: dinov3_vitb16, layers: [9]}
    input: {height: 512, width: 512, color_order: rgb, mean: [...], std: [...], resize: bilinear,
            dtype: float32, layout: NCHW, batch: 1}          # batch null = dynamic
    outputs:
    - {name: anomaly_map, shape: [1, 1, 512, 512], dtype: float32}
    - {name: score, shape: [1], dtype: float32}
    normalization: {map_loc: 0.1, map_scale: 0.02, score_loc: 0.3, score_scale: 0.05, num_images: 16}
    thresholds: {image_threshold: 3.1, pixel_threshold: 2.7, target_fpr: 0.01, pixel_fpr: 0.01,
                 source: good-fpr, details: {num_images: 16, fit_fpr: 0.0}}        # or null
    precision: fp16                         # fp32 | fp16 | int8
    target: jetson-orin                     # a name from edge_ad.runtime.targets
    engine: {name: tensorrt, hints: {}}     # OpenVINO: hints: {INFERENCE_PRECISION_HINT: f32}
    calibration: {count: 256, hash: <sha256 hex>, synthetic_fraction: 0.25, details: {seed: 0}}
                                            # or null; required for int8
    fidelity: {map_max_abs_err: 0.003, image_auroc_delta: 0.0}               # summary, or null
    info: {}                                # free-form plain values for people and tools; never read
    artifacts:
      model.onnx: {sha256: <hex>, bytes: 1234}
    manifest_sha256: <hex>                  # seal: sha256 of the canonical JSON of everything above

Guarantees:

* No pickle anywhere: artifacts with pickle suffixes (``.pt``, ``.pth``, ``.pkl``, ...), pickle
  byte streams, zip archives holding pickles and object-dtype ``.npy`` / ``.npz`` are refused when
  writing and when loading; ONNX / IR files must look like protobuf / XML.
* Loading validates the schema strictly (unknown, missing or mistyped keys name the field), the
  schema version (a newer bundle says which edge-ad it needs), cross-field consistency (precision
  allowed by the target, engine of the target, pinned OpenVINO precision hint, calibration for
  INT8, required artifacts), the manifest seal and every artifact's size and sha256.
* Tar bundles are extracted safely: regular files and directories only; absolute paths, ``..``
  components, links, devices and duplicate members are refused.
* Writing stages everything in a sibling directory, writes ``manifest.yaml`` last, then swaps the
  directory in (or renames the finished ``.tar``), so a crash never leaves a half bundle under the
  real name; it refuses to replace anything that is not a bundle.

Torch-free; needs numpy and PyYAML only.
"""
from __future__ import annotations

import ast
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
import time
import types
import weakref
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Union

from .preprocess_spec import RESIZE_MODES, PreprocessSpec
from .targets import OPENVINO_PRECISION_HINTS, PRECISIONS, Target, get_target, list_targets

__all__ = [
    "ARTIFACT_ONNX",
    "ARTIFACT_OPENVINO_BIN",
    "ARTIFACT_OPENVINO_XML",
    "ENGINES_DIR",
    "FIDELITY_FILE",
    "MANIFEST_FILE",
    "SCHEMA_VERSION",
    "ArtifactRecord",
    "BackboneInfo",
    "Bundle",
    "BundleError",
    "Calibration",
    "EngineSpec",
    "InputSpec",
    "Manifest",
    "OutputSpec",
    "Thresholds",
    "current_sdk_version",
    "load_bundle",
    "manifest_digest",
    "update_manifest",
    "write_bundle",
]

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.yaml"
FIDELITY_FILE = "fidelity.json"
ARTIFACT_ONNX = "model.onnx"
ARTIFACT_OPENVINO_XML = "openvino/model.xml"
ARTIFACT_OPENVINO_BIN = "openvino/model.bin"
ENGINES_DIR = "engines"
_SEAL_KEY = "manifest_sha256"

INPUT_COLOR_ORDERS = ("rgb",)
INPUT_DTYPES = ("float32", "float16")
OUTPUT_DTYPES = ("float32", "float16")
LAYOUTS = ("NCHW",)
#: Suffixes that mean "pickle inside" (PyTorch, joblib, dill): never allowed in a bundle.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".dill", ".sav")

_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20
_FIX_EDIT = "re-create the bundle (edge-ad convert / write_bundle) instead of editing manifest.yaml by hand"

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]


class BundleError(ValueError):
    """A bundle (or a manifest being built) is invalid; the message names the file / field and the fix."""


# --------------------------------------------------------------------------------------------
# small typed validators: every error names the manifest field
# --------------------------------------------------------------------------------------------


def _fail(where: str, what: str, value: Any) -> BundleError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return BundleError(f"manifest field '{where}': expected {what}, got {shown} ({type(value).__name__})")


def _str(value: Any, where: str, *, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, "a non-empty string" + (f" (one of {', '.join(choices)})" if choices else ""), value)
    if choices is not None and value not in choices:
        raise BundleError(f"manifest field '{where}': {value!r} is not one of {', '.join(choices)}")
    return value


def _opt_str(value: Any, where: str) -> str | None:
    return None if value is None else _str(value, where)


def _int(value: Any, where: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, "an integer" + (f" >= {minimum}" if minimum is not None else ""), value)
    if minimum is not None and value < minimum:
        raise _fail(where, f"an integer >= {minimum}", value)
    return int(value)


def _float(value: Any, where: str, *, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise _fail(where, "a finite number", value)
    value = float(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise _fail(where, f"a number in [{low}, {high}]", value)
    return value


def _opt_float(value: Any, where: str, **kw: Any) -> float | None:
    return None if value is None else _float(value, where, **kw)


def _seq(value: Any, where: str, what: str) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise _fail(where, what, value)
    return list(value)


def _plain(value: Any, where: str) -> Any:
    """A deep copy of ``value`` restricted to JSON types (str keys, finite floats)."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _fail(where, "a finite number (use null for undefined values)", value)
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _fail(f"{where}.{k}", "string keys", k)
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise _fail(where, "plain YAML/JSON values (str, number, bool, null, list, mapping)", value)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(where, "a mapping", value)
    return value


def _check_keys(d: Any, where: str, keys: tuple[str, ...]) -> Mapping[str, Any]:
    """``d`` must be a mapping with exactly ``keys`` (manifest files carry every key)."""
    d = _mapping(d, where)
    section = "manifest top level" if where == "manifest" else f"manifest section '{where}'"
    unknown = sorted(str(k) for k in d if k not in keys)
    if unknown:
        raise BundleError(
            f"{section}: unknown key(s) {unknown}; allowed keys: {', '.join(keys)} "
            "(a typo, or a bundle from a newer edge-ad with the same schema_version?)"
        )
    missing = [k for k in keys if k not in d]
    if missing:
        raise BundleError(
            f"{section}: missing key(s) {missing}; every key of the schema must be present "
            f"(use null where a value is optional); {_FIX_EDIT}"
        )
    return d


def _readonly(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(d))


# --------------------------------------------------------------------------------------------
# manifest sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneInfo:
    """The feature extractor the model was built on (informational; the ONNX holds the weights)."""

    name: str
    layers: tuple[int, ...] = ()

    KEYS = ("name", "layers")

    def __post_init__(self) -> None:
        _str(self.name, "backbone.name")
        layers = _seq(self.layers, "backbone.layers", "a list of integers")
        object.__setattr__(self, "layers", tuple(_int(v, f"backbone.layers[{i}]") for i, v in enumerate(layers)))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: Any) -> "BackboneInfo":
        d = _check_keys(d, "backbone", cls.KEYS)
        return cls(name=d["name"], layers=d["layers"])


@dataclass(frozen=True)
class InputSpec:
    """The model input: size, colour order, normalisation, resize, dtype, layout, batch.

    ``preprocess_spec`` is the :class:`PreprocessSpec` the runtime feeds frames through.
    ``batch=None`` means a dynamic batch dimension.
    """

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "bilinear"
    color_order: str = "rgb"
    dtype: str = "float32"
    layout: str = "NCHW"
    batch: int | None = 1

    KEYS = ("height", "width", "color_order", "mean", "std", "resize", "dtype", "layout", "batch")

    def __post_init__(self) -> None:
        _int(self.height, "input.height", minimum=1)
        _int(self.width, "input.width", minimum=1)
        for key in ("mean", "std"):
            values = _seq(getattr(self, key), f"input.{key}", "a list of three numbers (RGB)")
            if len(values) != 3:
                raise _fail(f"input.{key}", "a list of three numbers (RGB)", values)
            object.__setattr__(self, key, tuple(_float(v, f"input.{key}[{i}]") for i, v in enumerate(values)))
        if any(s <= 0 for s in self.std):
            raise _fail("input.std", "positive numbers", list(self.std))
        _str(self.resize, "input.resize", choices=RESIZE_MODES)
        if self.color_order != "rgb":
            raise BundleError(
                f"manifest field 'input.color_order': {self.color_order!r} is not supported; edge_ad models take "
                "'rgb' input (the runtime's preprocess converts BGR camera frames), so write 'rgb'"
            )
        _str(self.dtype, "input.dtype", choices=INPUT_DTYPES)
        _str(self.layout, "input.layout", choices=LAYOUTS)
        if self.batch is not None:
            _int(self.batch, "input.batch", minimum=1)

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        """The runtime preprocessing for this input."""
        return PreprocessSpec(self.height, self.width, mean=self.mean, std=self.std, resize=self.resize)

    @classmethod
    def from_preprocess_spec(cls, spec: PreprocessSpec, **kwargs: Any) -> "InputSpec":
        """Build from a detector's / run's :class:`PreprocessSpec` (``dtype``, ``batch``... in ``kwargs``)."""
        return cls(height=spec.height, width=spec.width, mean=spec.mean, std=spec.std, resize=spec.resize, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "height": self.height,
            "width": self.width,
            "color_order": self.color_order,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
            "dtype": self.dtype,
            "layout": self.layout,
            "batch": self.batch,
        }

    @classmethod
    def from_dict(cls, d: Any) -> "InputSpec":
        d = _check_keys(d, "input", cls.KEYS)
        return cls(**{k: d[k] for k in cls.KEYS})


@dataclass(frozen=True)
class OutputSpec:
    """One model output: name, shape (ints, or strings for symbolic dimensions) and dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    KEYS = ("name", "shape", "dtype")

    def __post_init__(self) -> None:
        _str(self.name, "outputs[].name")
        where = f"outputs[{self.name}].shape"
        dims = _seq(self.shape, where, "a list of dimensions")
        for i, dim in enumerate(dims):
            if isinstance(dim, str):
                _str(dim, f"{where}[{i}]")
            else:
                _int(dim, f"{where}[{i}]", minimum=1)
        object.__setattr__(self, "shape", tuple(dims))
        _str(self.dtype, f"outputs[{self.name}].dtype", choices=OUTPUT_DTYPES)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Any, index: int = 0) -> "OutputSpec":
        d = _check_keys(d, f"outputs[{index}]", cls.KEYS)
        return cls(**{k: d[k] for k in cls.KEYS})


def _summary_details(d: Mapping[str, Any], known: tuple[str, ...], where: str) -> dict[str, Any]:
    """The other keys of a richer summary dict: scalars and flat mappings of scalars (lists are dropped)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k in known:
            continue
        if v is None or isinstance(v, (bool, int, float, str)):
            out[str(k)] = v
        elif isinstance(v, Mapping) and all(x is None or isinstance(x, (bool, int, float, str)) for x in v.values()):
            out[str(k)] = dict(v)
    return _plain(out, f"{where}.details")


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds on the normalised score / map (None = not calibrated).

    ``details`` holds how they were fitted (num_images, fit_fpr, method, score statistics, ...):
    plain values for people and tools; the runtime reads only the named fields.
    """

    image_threshold: float | None = None
    pixel_threshold: float | None = None
    target_fpr: float | None = None
    pixel_fpr: float | None = None
    source: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    KEYS = ("image_threshold", "pixel_threshold", "target_fpr", "pixel_fpr", "source", "details")

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_threshold", _opt_float(self.image_threshold, "thresholds.image_threshold"))
        object.__setattr__(self, "pixel_threshold", _opt_float(self.pixel_threshold, "thresholds.pixel_threshold"))
        object.__setattr__(self, "target_fpr", _opt_float(self.target_fpr, "thresholds.target_fpr", low=0.0, high=1.0))
        object.__setattr__(self, "pixel_fpr", _opt_float(self.pixel_fpr, "thresholds.pixel_fpr", low=0.0, high=1.0))
        _opt_str(self.source, "thresholds.source")
        details = _plain(_mapping(self.details, "thresholds.details"), "thresholds.details")
        object.__setattr__(self, "details", _readonly(details))

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.KEYS}
        d["details"] = json.loads(json.dumps(dict(self.details)))
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "Thresholds":
        d = _check_keys(d, "thresholds", cls.KEYS)
        return cls(**{k: d[k] for k in cls.KEYS})

    @classmethod
    def from_summary(cls, d: Mapping[str, Any]) -> "Thresholds":
        """Lenient: from a richer dict (``edge_ad.calibration.Thresholds.to_dict()``): the named fields
        are taken, other scalars / flat mappings go to ``details``, lists are dropped; ``source: ""`` is None."""
        d = _mapping(d, "thresholds")
        named = ("image_threshold", "pixel_threshold", "target_fpr", "pixel_fpr", "source")
        fields_ = {k: d.get(k) for k in named}
        fields_["source"] = fields_["source"] or None
        return cls(**fields_, details=_summary_details(d, named, "thresholds"))


@dataclass(frozen=True)
class EngineSpec:
    """Which engine runs the bundle and its pinned options (OpenVINO: INFERENCE_PRECISION_HINT)."""

    name: str
    hints: Mapping[str, Any] = field(default_factory=dict)

    KEYS = ("name", "hints")

    def __post_init__(self) -> None:
        _str(self.name, "engine.name")
        hints = _mapping(self.hints, "engine.hints")
        for k, v in hints.items():
            if not isinstance(k, str) or isinstance(v, (Mapping, list, tuple)) or not (
                v is None or isinstance(v, (str, int, float, bool))
            ):
                raise _fail(f"engine.hints.{k}", "a scalar (string, number, bool)", v)
        object.__setattr__(self, "hints", _readonly(_plain(hints, "engine.hints")))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "hints": dict(self.hints)}

    @classmethod
    def from_dict(cls, d: Any) -> "EngineSpec":
        d = _check_keys(d, "engine", cls.KEYS)
        return cls(name=d["name"], hints=_mapping(d["hints"], "engine.hints"))


@dataclass(frozen=True)
class Calibration:
    """The calibration set behind INT8 scales / thresholds: size, content hash, synthetic share.

    ``details`` holds other plain facts about it (seed, selection, source...); long lists such as
    file names belong in a separate artifact (e.g. ``calibration.json``), not in the manifest.
    """

    count: int
    hash: str
    synthetic_fraction: float = 0.0
    details: Mapping[str, Any] = field(default_factory=dict)

    KEYS = ("count", "hash", "synthetic_fraction", "details")

    def __post_init__(self) -> None:
        _int(self.count, "calibration.count", minimum=1)
        _str(self.hash, "calibration.hash")
        if any(c.isspace() for c in self.hash):
            raise _fail("calibration.hash", "a hash string without whitespace", self.hash)
        fraction = _float(self.synthetic_fraction, "calibration.synthetic_fraction", low=0.0, high=1.0)
        object.__setattr__(self, "synthetic_fraction", fraction)
        object.__setattr__(
            self, "details", _readonly(_plain(_mapping(self.details, "calibration.details"), "calibration.details"))
        )

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "hash": self.hash, "synthetic_fraction": self.synthetic_fraction,
                "details": json.loads(json.dumps(dict(self.details)))}

    @classmethod
    def from_dict(cls, d: Any) -> "Calibration":
        d = _check_keys(d, "calibration", cls.KEYS)
        return cls(**{k: d[k] for k in cls.KEYS})

    @classmethod
    def from_summary(cls, d: Mapping[str, Any]) -> "Calibration":
        """Lenient: from a richer dict (``edge_ad.calibration.CalibrationSet.to_manifest()``): count, hash and
        synthetic_fraction are taken, other scalars / flat mappings go to ``details``, lists are dropped."""
        d = _mapping(d, "calibration")
        named = ("count", "hash", "synthetic_fraction")
        missing = [k for k in ("count", "hash") if k not in d]
        if missing:
            raise BundleError(f"calibration summary lacks {missing}; it needs at least count and hash")
        return cls(count=d["count"], hash=d["hash"], synthetic_fraction=d.get("synthetic_fraction", 0.0),
                   details=_summary_details(d, named, "calibration"))


@dataclass(frozen=True)
class ArtifactRecord:
    """Size and sha256 of one bundle file (computed by :func:`write_bundle`)."""

    sha256: str
    bytes: int

    KEYS = ("sha256", "bytes")

    def __post_init__(self) -> None:
        if not isinstance(self.sha256, str) or not _SHA256.match(self.sha256):
            raise _fail("artifacts[].sha256", "64 lower-case hex digits", self.sha256)
        _int(self.bytes, "artifacts[].bytes", minimum=0)

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "bytes": self.bytes}

    @classmethod
    def from_dict(cls, d: Any, name: str) -> "ArtifactRecord":
        d = _check_keys(d, f"artifacts.{name}", cls.KEYS)
        try:
            return cls(sha256=d["sha256"], bytes=d["bytes"])
        except BundleError as e:
            raise BundleError(str(e).replace("artifacts[]", f"artifacts.{name}")) from None


def current_sdk_version() -> str:
    """The installed edge-ad version (from package metadata; the runtime imports nothing from edge_ad)."""
    import importlib.metadata as metadata

    try:
        return metadata.version("edge-ad")
    except metadata.PackageNotFoundError:  # pragma: no cover - source tree without install
        return "0+unknown"


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _parse_iso(value: str, where: str) -> None:
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    try:
        _dt.datetime.fromisoformat(text)
    except ValueError:
        raise _fail(where, "an ISO 8601 time such as '2025-01-01T12:00:00+00:00'", value) from None


@dataclass(frozen=True)
class Manifest:
    """Everything the device needs to know about a bundle; ``manifest.yaml`` is :meth:`to_dict`.

    Construction validates every field and the cross-field rules (precision allowed by the target,
    engine of the target, pinned OpenVINO hint, calibration for INT8), raising :class:`BundleError`.
    ``artifacts`` is filled in by :func:`write_bundle`; pass it empty when building a manifest.
    """

    method: str
    backbone: BackboneInfo
    input: InputSpec
    outputs: tuple[OutputSpec, ...]
    precision: str
    target: str
    engine: EngineSpec
    normalization: Mapping[str, float] = field(default_factory=dict)
    thresholds: Thresholds | None = None
    calibration: Calibration | None = None
    fidelity: Mapping[str, Any] | None = None
    info: Mapping[str, Any] = field(default_factory=dict)
    artifacts: Mapping[str, ArtifactRecord] = field(default_factory=dict)
    sdk_version: str = field(default_factory=current_sdk_version)
    created: str = field(default_factory=_now_iso)
    schema_version: int = SCHEMA_VERSION

    KEYS = (
        "schema_version", "sdk_version", "created", "method", "backbone", "input", "outputs",
        "normalization", "thresholds", "precision", "target", "engine", "calibration", "fidelity",
        "info", "artifacts",
    )

    def __post_init__(self) -> None:
        if _int(self.schema_version, "schema_version") != SCHEMA_VERSION:
            raise BundleError(
                f"manifest field 'schema_version': this edge-ad writes and reads {SCHEMA_VERSION}, "
                f"got {self.schema_version}"
            )
        _str(self.sdk_version, "sdk_version")
        _parse_iso(_str(self.created, "created"), "created")
        _str(self.method, "method")
        for key, cls in (("backbone", BackboneInfo), ("input", InputSpec), ("engine", EngineSpec)):
            if not isinstance(getattr(self, key), cls):
                raise _fail(key, f"a {cls.__name__}", getattr(self, key))
        outputs = _seq(self.outputs, "outputs", "a list of OutputSpec")
        if not outputs or not all(isinstance(o, OutputSpec) for o in outputs):
            raise _fail("outputs", "a non-empty list of OutputSpec", self.outputs)
        names = [o.name for o in outputs]
        if len(set(names)) != len(names):
            raise BundleError(f"manifest field 'outputs': output names must be unique, got {names}")
        object.__setattr__(self, "outputs", tuple(outputs))

        norm = _mapping(self.normalization, "normalization")
        object.__setattr__(
            self, "normalization",
            _readonly({str(k): (_int(v, f"normalization.{k}") if isinstance(v, int) and not isinstance(v, bool)
                                else _float(v, f"normalization.{k}")) for k, v in norm.items()}),
        )
        if self.thresholds is not None and not isinstance(self.thresholds, Thresholds):
            raise _fail("thresholds", "Thresholds or null", self.thresholds)
        if self.calibration is not None and not isinstance(self.calibration, Calibration):
            raise _fail("calibration", "Calibration or null", self.calibration)
        if self.fidelity is not None:
            object.__setattr__(self, "fidelity", _readonly(_plain(_mapping(self.fidelity, "fidelity"), "fidelity")))
        object.__setattr__(self, "info", _readonly(_plain(_mapping(self.info, "info"), "info")))

        artifacts = _mapping(self.artifacts, "artifacts")
        for name, record in artifacts.items():
            _check_artifact_name(name)
            if not isinstance(record, ArtifactRecord):
                raise _fail(f"artifacts.{name}", "an ArtifactRecord", record)
        object.__setattr__(self, "artifacts", _readonly(dict(sorted(artifacts.items()))))

        # Cross-field rules.
        _str(self.precision, "precision", choices=PRECISIONS)
        _str(self.target, "target")
        try:
            target = get_target(self.target)
        except KeyError:
            raise BundleError(
                f"manifest field 'target': unknown target {self.target!r}; registered targets: "
                f"{', '.join(list_targets())} (register_target() it before loading if it is a custom one)"
            ) from None
        if self.precision not in target.precisions:
            raise BundleError(
                f"manifest field 'precision': {self.precision!r} is not allowed on target {target.name!r} "
                f"(allowed: {', '.join(target.precisions)}); convert with one of those or pick another target"
            )
        if self.engine.name != target.engine:
            raise BundleError(
                f"manifest field 'engine.name': {self.engine.name!r} does not match target {target.name!r}, "
                f"which runs on {target.engine!r}; write engine.name: {target.engine}"
            )
        if target.engine == "openvino":
            self._check_openvino_hint(target)
        if self.precision == "int8" and self.calibration is None:
            raise BundleError(
                "manifest field 'calibration': precision int8 needs the calibration record "
                "{count, hash, synthetic_fraction} of the set the scales came from; it is null"
            )

    def _check_openvino_hint(self, target: Target) -> None:
        hint = self.engine.hints.get("INFERENCE_PRECISION_HINT")
        where = "manifest field 'engine.hints.INFERENCE_PRECISION_HINT'"
        expected = target.openvino_precision_hint(self.precision)
        if hint is None:
            raise BundleError(
                f"{where} is missing: OpenVINO bundles pin the inference precision (else the CPU plugin may pick "
                f"bf16 silently); for {target.name} at {self.precision} write {expected!r}"
            )
        if hint not in OPENVINO_PRECISION_HINTS:
            raise BundleError(
                f"{where}: {hint!r} is not allowed (allowed: {', '.join(OPENVINO_PRECISION_HINTS)}; "
                "bf16 is never used); "
                f"for {target.name} at {self.precision} write {expected!r}"
            )
        if self.precision == "fp32" and hint != "f32":
            raise BundleError(f"{where}: {hint!r} would compute below the declared precision fp32; write 'f32'")

    # -- derived views ------------------------------------------------------------------------

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        """The runtime preprocessing of this bundle's input."""
        return self.input.preprocess_spec

    @property
    def target_info(self) -> Target:
        """The registry entry of :attr:`target`."""
        return get_target(self.target)

    def check_complete(self) -> None:
        """Artifacts the engine needs are listed: ``model.onnx`` always, the IR for OpenVINO."""
        required = [ARTIFACT_ONNX]
        if self.engine.name == "openvino":
            required += [ARTIFACT_OPENVINO_XML, ARTIFACT_OPENVINO_BIN]
        missing = [n for n in required if n not in self.artifacts]
        if missing:
            raise BundleError(
                f"manifest field 'artifacts': missing {missing} (a {self.engine.name} bundle for {self.target} "
                f"needs {required}); pass them to write_bundle"
            )

    # -- (de)serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain types in schema order: exactly what ``manifest.yaml`` holds (minus the seal)."""
        return {
            "schema_version": self.schema_version,
            "sdk_version": self.sdk_version,
            "created": self.created,
            "method": self.method,
            "backbone": self.backbone.to_dict(),
            "input": self.input.to_dict(),
            "outputs": [o.to_dict() for o in self.outputs],
            "normalization": dict(self.normalization),
            "thresholds": self.thresholds.to_dict() if self.thresholds is not None else None,
            "precision": self.precision,
            "target": self.target,
            "engine": self.engine.to_dict(),
            "calibration": self.calibration.to_dict() if self.calibration is not None else None,
            "fidelity": json.loads(json.dumps(dict(self.fidelity))) if self.fidelity is not None else None,
            "info": json.loads(json.dumps(dict(self.info))),
            "artifacts": {name: rec.to_dict() for name, rec in self.artifacts.items()},
        }

    @classmethod
    def from_dict(cls, d: Any) -> "Manifest":
        """Strict inverse of :meth:`to_dict`: unknown / missing keys and wrong types raise :class:`BundleError`."""
        d = _check_keys(d, "manifest", cls.KEYS)
        version = _int(d["schema_version"], "schema_version")
        if version != SCHEMA_VERSION:
            raise _schema_version_error(version, d.get("sdk_version"), "this manifest")
        outputs = _seq(d["outputs"], "outputs", "a list of {name, shape, dtype}")
        artifacts = _mapping(d["artifacts"], "artifacts")
        return cls(
            schema_version=version,
            sdk_version=d["sdk_version"],
            created=d["created"],
            method=d["method"],
            backbone=BackboneInfo.from_dict(d["backbone"]),
            input=InputSpec.from_dict(d["input"]),
            outputs=tuple(OutputSpec.from_dict(o, i) for i, o in enumerate(outputs)),
            normalization=_mapping(d["normalization"], "normalization"),
            thresholds=None if d["thresholds"] is None else Thresholds.from_dict(d["thresholds"]),
            precision=d["precision"],
            target=d["target"],
            engine=EngineSpec.from_dict(d["engine"]),
            calibration=None if d["calibration"] is None else Calibration.from_dict(d["calibration"]),
            fidelity=d["fidelity"],
            info=d["info"],
            artifacts={str(k): ArtifactRecord.from_dict(v, str(k)) for k, v in artifacts.items()},
        )

    def replace(self, **changes: Any) -> "Manifest":
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


def _schema_version_error(version: int, sdk_version: Any, what: str) -> BundleError:
    from_sdk = f", written by edge-ad {sdk_version}" if isinstance(sdk_version, str) else ""
    if version > SCHEMA_VERSION:
        need = f">= {sdk_version}" if isinstance(sdk_version, str) else "a newer release"
        return BundleError(
            f"{what} uses bundle schema_version {version}{from_sdk}; this edge-ad {current_sdk_version()} reads "
            f"schema_version {SCHEMA_VERSION} only. Upgrade edge-ad on this machine to {need} "
            f"(pip install -U edge-ad), or re-convert the model with edge-ad {current_sdk_version()}"
        )
    return BundleError(
        f"{what} has unknown bundle schema_version {version}{from_sdk}; edge-ad {current_sdk_version()} reads "
        f"schema_version {SCHEMA_VERSION}. It was not written by a released edge-ad: re-convert the model"
    )


def manifest_digest(manifest: Manifest | Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a manifest (the value of ``manifest_sha256``).

    Canonical = :meth:`Manifest.to_dict`, sorted keys, no whitespace, UTF-8: the seal protects the
    manifest's meaning, not its YAML formatting.
    """
    d = manifest.to_dict() if isinstance(manifest, Manifest) else dict(manifest)
    text = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# artifacts: names, pickle-freedom, hashing
# --------------------------------------------------------------------------------------------


def _check_artifact_name(name: Any) -> str:
    if not isinstance(name, str) or not _ARTIFACT_NAME.match(name) or any(
        part in (".", "..") for part in name.split("/")
    ):
        raise BundleError(
            f"artifact name {name!r} is not a plain relative path (letters, digits, '._-', '/' between parts, "
            "no '..'); rename it, e.g. 'model.onnx' or 'openvino/model.xml'"
        )
    if name == MANIFEST_FILE or name.split("/")[0] == ENGINES_DIR:
        raise BundleError(
            f"artifact name {name!r} is reserved ({MANIFEST_FILE} is written by write_bundle; {ENGINES_DIR}/ holds "
            "engines built on the device); pick another name"
        )
    lower = name.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        raise BundleError(
            f"artifact {name!r}: suffix {PurePosixPath(lower).suffix} means pickle, which bundles never hold "
            "(loading a pickle runs code). Export weights to ONNX, safetensors or a plain .npy instead"
        )
    return name


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


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _is_bundle_tar(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:*") as tf:
            names = {m.name.removeprefix("./") for m in tf.getmembers()}
    except (tarfile.TarError, OSError):
        return False
    return MANIFEST_FILE in names or any(n.count("/") == 1 and n.endswith("/" + MANIFEST_FILE) for n in names)


def write_bundle(
    out: str | os.PathLike,
    manifest: Manifest,
    artifacts: Mapping[str, Source],
    *,
    fidelity: Mapping[str, Any] | None = None,
    tar: bool = False,
) -> Path:
    """Write a bundle: copy ``artifacts`` in, hash them, write the sealed manifest last.

    Args:
        out: the bundle directory (created; an existing *bundle* or an empty directory is replaced, anything
            else is refused), or with ``tar=True`` the ``.tar`` file (``.tar`` is appended when missing).
        manifest: validated :class:`Manifest`; its ``artifacts`` field is replaced by the computed records.
        artifacts: bundle-relative name (``"model.onnx"``, ``"openvino/model.xml"``) -> source file path or bytes.
        fidelity: the full fidelity report, written as ``fidelity.json`` (plain JSON values; use None for NaN).
        tar: write one uncompressed ``.tar`` (members at its root, ``manifest.yaml`` first) instead of a directory.

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
            _check_not_pickle(name, dest)
        if FIDELITY_FILE in records:
            _read_fidelity(staging / FIDELITY_FILE)
        final = manifest.replace(artifacts=records)
        final.check_complete()
        _write_text_atomic(staging / MANIFEST_FILE, _manifest_text(final))  # last: a bundle is complete when it has one
        if tar:
            _write_tar(staging, out, [MANIFEST_FILE, *sorted(records)])
        else:
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
    """Replace ``out`` (absent, empty or an old bundle) by the finished ``staging`` directory."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        if old is not None:
            os.rename(old, out)  # put the previous bundle back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_tar(staging: Path, out: Path, names: list[str]) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
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
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def update_manifest(bundle_dir: str | os.PathLike, changes: Mapping[str, Any]) -> Manifest:
    """Change top-level manifest fields of a directory bundle (e.g. ``thresholds``) and re-seal it.

    The bundle is verified first; ``artifacts`` and ``schema_version`` cannot be changed here
    (re-write the bundle). Values may be plain dicts or the section dataclasses.
    """
    path = Path(bundle_dir)
    if not path.is_dir():
        raise BundleError(f"update_manifest works on bundle directories; {path} is not one (extract the .tar first)")
    bundle = load_bundle(path, verify=True)
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
    _write_text_atomic(path / MANIFEST_FILE, _manifest_text(manifest))
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
        """Re-check every artifact's size, sha256 and pickle-freedom (raises :class:`BundleError`)."""
        _verify_artifacts(self.root, self.manifest, checksums=True, label=str(self.source))

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
) -> Bundle:
    """Load and validate a bundle directory or ``.tar``.

    Args:
        path: bundle directory, or ``.tar`` written by :func:`write_bundle` (``tar -cf`` of a bundle
            directory works too; members may sit under one top-level folder).
        verify: check the manifest seal and every artifact's sha256 (sizes, schema and pickle-freedom
            are always checked). Turn off only for fast restarts of a bundle verified before.
        extract_to: where to extract a ``.tar`` (a new or empty directory, kept); default a
            temporary directory removed by :meth:`Bundle.close` or garbage collection.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        BundleError: anything else, with the file / field and the fix in the message.
    """
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
            _safe_extract(source, root)
            return _load_dir(root, source, verify, temp_dir)
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
    return _load_dir(root, source, verify, temp_dir)


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


def _load_dir(root: Path, source: Path, verify: bool, temp_dir: Path | None) -> Bundle:
    label = str(source)
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
    _verify_artifacts(root, manifest, checksums=verify, label=label)
    fidelity = _read_fidelity(root / FIDELITY_FILE) if FIDELITY_FILE in manifest.artifacts else None
    return Bundle(root, source, manifest, fidelity, temp_dir)


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

