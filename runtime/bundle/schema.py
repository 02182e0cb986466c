"""The manifest schema: constants, typed validators, section dataclasses, :class:`Manifest` and its seal.

Every error is a :class:`BundleError` naming the manifest field and the fix. Torch-free; numpy-free.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Union

from ..preprocess_spec import RESIZE_MODES, PreprocessSpec
from ..targets import OPENVINO_PRECISION_HINTS, PRECISIONS, Target, get_target, list_targets

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.yaml"
#: Optional Ed25519 signature of the manifest seal (:mod:`.signing`); not an artifact (it signs the manifest).
SIGNATURE_FILE = "manifest.sig"
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


def _check_artifact_name(name: Any) -> str:
    if not isinstance(name, str) or not _ARTIFACT_NAME.match(name) or any(
        part in (".", "..") for part in name.split("/")
    ):
        raise BundleError(
            f"artifact name {name!r} is not a plain relative path (letters, digits, '._-', '/' between parts, "
            "no '..'); rename it, e.g. 'model.onnx' or 'openvino/model.xml'"
        )
    if name in (MANIFEST_FILE, SIGNATURE_FILE) or name.split("/")[0] == ENGINES_DIR:
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
